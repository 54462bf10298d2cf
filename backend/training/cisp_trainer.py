"""Train CISP (paper 002): the contrastive joint image/voxel embedding, then its conditioned voxel diffusion;
and, for the paper's comparison, the same voxel diffusion conditioned on CLIP image embeddings instead.

1. Contrastive phase: :meth:`backend.models.cisp.CISP.contrastive_loss` (symmetric InfoNCE, learnable temperature)
   over (random view of shape i, voxels of shape i) pairs of the training split.
2. Diffusion phase: the encoders are frozen; the DDPM (eps-prediction, classifier-free-guidance dropout) learns
   voxels of shape i conditioned on the joint embedding of a random view of shape i
   (:meth:`CISP.diffusion_loss`), which is what image-to-shape feeds it at test time.
3. Baseline (paper 002's CLIP-guided model): an identical denoiser conditioned on the starter CLIP's image
   embedding of the same views, same steps and seed, saved as ``cisp_clipcond``.

Simplification (CPU training, stated): voxels are 16^3 (the data set's 32^3 grid pooled: a cell is occupied when
at least a quarter of its 8 children are) instead of the paper's 32^3, and the encoders are small ViTs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.training.common import StepLogger, TrainResult, past_deadline, seed_everything
from backend.training.dataset import StarterDataset
from backend.training.svr_trainer import white_images

log = logging.getLogger(__name__)


@dataclass
class CISPTrainConfig:
    embed_dim: int = 128
    image_size: int = 64
    image_patch: int = 8
    voxel_res: int = 16
    voxel_patch: int = 4
    width: int = 96
    layers: int = 2
    heads: int = 4
    unet_channels: tuple = (8, 16, 32)
    cond_tokens: int = 4
    sample_steps: int = 25
    guidance_scale: float = 3.0
    contrastive_steps: int = 400
    diffusion_steps: int = 600
    batch_size: int = 16
    lr: float = 5e-4
    seed: int = 0

    def model_config(self, embed_dim: int | None = None):
        from backend.models.cisp import CISPConfig

        return CISPConfig(embed_dim=embed_dim or self.embed_dim, image_size=self.image_size,
                          image_patch=self.image_patch, voxel_res=self.voxel_res, voxel_patch=self.voxel_patch,
                          width=self.width, layers=self.layers, heads=self.heads,
                          unet_channels=tuple(self.unet_channels), cond_tokens=self.cond_tokens,
                          sample_steps=self.sample_steps, guidance_scale=self.guidance_scale)


def pooled_voxels(data: StarterDataset, res: int) -> torch.Tensor:
    """(N, res, res, res) float occupancy: the data set's grid pooled down to ``res`` (>= 1/4 of children)."""
    grids = torch.from_numpy(np.stack([data.voxel_grid(i) for i in range(len(data))]).astype(np.float32))
    if grids.shape[-1] == res:
        return grids
    pooled = F.adaptive_avg_pool3d(grids[:, None], res)[:, 0]
    return (pooled >= 0.25).float()


def _image_batch(data, idx, views):
    return white_images(data, idx, views)


def train_cisp(data: StarterDataset, cfg: CISPTrainConfig, device: str = "cpu", out_dir: str | Path | None = None,
               clip=None, clip_out_dir: str | Path | None = None) -> TrainResult:
    """Phases 1 and 2 for CISP; phase 3 (CLIP-conditioned baseline) when ``clip`` is given."""
    from backend.models.cisp import CISP

    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vox = pooled_voxels(data, cfg.voxel_res)
    n, v = len(data), data.n_views
    model = CISP(cfg.model_config()).to(device).train()
    result = TrainResult("cisp")
    logger = StepLogger(result, cfg.contrastive_steps, every=50)
    enc_params = list(model.image_encoder.parameters()) + list(model.voxel_encoder.parameters()) + [model.logit_scale]
    opt = torch.optim.AdamW(enc_params, lr=cfg.lr, weight_decay=0.05)
    for step in range(cfg.contrastive_steps):
        idx = rng.choice(n, size=min(2 * cfg.batch_size, n), replace=False)  # distinct shapes: clean negatives
        views = rng.integers(0, v, size=len(idx))
        loss = model.contrastive_loss(_image_batch(data, idx, views).to(device), vox[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if logger(step, loss.item()):
            break
    result = logger.finish()
    model.image_encoder.requires_grad_(False)
    model.voxel_encoder.requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    with torch.no_grad():  # retrieval accuracy image -> voxel on (up to) 128 training shapes
        idx = np.arange(min(n, 128))
        fi = model.encode_image(_image_batch(data, idx, np.zeros(len(idx), int)).to(device))
        fv = model.encode_voxels(vox[idx].to(device))
        result.metrics["retrieval_top1"] = float(((fi @ fv.t()).argmax(1).cpu().numpy() == idx).mean())

    def embed_cisp(idx, views):
        with torch.no_grad():
            return model.encode_image(_image_batch(data, idx, views).to(device))

    d_losses = _train_denoiser(model, embed_cisp, vox, n, v, cfg, device, rng_seed=cfg.seed + 1)
    result.diffusion_losses = d_losses  # type: ignore[attr-defined]
    model.eval()
    result.model = model  # type: ignore[attr-defined]
    if out_dir is not None:
        result.out_dir = str(model.save(out_dir))
    if clip is not None:
        base = CISP(cfg.model_config(embed_dim=clip.embed_dim)).to(device).train()

        def embed_clip(idx, views):
            with torch.no_grad():
                return clip.encode_image(_image_batch(data, idx, views).to(device)).float()

        result.clip_diffusion_losses = _train_denoiser(  # type: ignore[attr-defined]
            base, embed_clip, vox, n, v, cfg, device, rng_seed=cfg.seed + 1)
        base.eval()
        result.clip_model = base  # type: ignore[attr-defined]
        if clip_out_dir is not None:
            base.save(clip_out_dir)
    return result


def _train_denoiser(model, embed, vox, n, v, cfg: CISPTrainConfig, device: str, rng_seed: int) -> list[float]:
    """Phase 2: DDPM loss of ``model``'s denoiser conditioned on ``embed(idx, views)``."""
    rng = np.random.default_rng(rng_seed)
    gen = torch.Generator().manual_seed(rng_seed)
    params = list(model.denoiser.parameters()) + [model.null_cond]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.diffusion_steps), eta_min=cfg.lr * 0.1)
    losses = []
    for step in range(cfg.diffusion_steps):
        idx = rng.integers(0, n, size=cfg.batch_size)
        views = rng.integers(0, v, size=cfg.batch_size)
        cond = embed(idx, views)
        loss = model.diffusion_loss(vox[idx].to(device), cond, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.diffusion_steps - 1:
            log.info("voxel diffusion step %d/%d loss %.4f", step + 1, cfg.diffusion_steps, loss.item())
        if past_deadline():
            log.warning("voxel diffusion: the training deadline has passed; stopping after step %d", step + 1)
            break
    return losses


def train_clipcond(data: StarterDataset, cfg: CISPTrainConfig, clip, device: str = "cpu",
                   out_dir: str | Path | None = None) -> TrainResult:
    """Phase 3 alone: paper 002's baseline denoiser conditioned on the starter CLIP's image embedding."""
    from backend.models.cisp import CISP

    seed_everything(cfg.seed)
    vox = pooled_voxels(data, cfg.voxel_res)
    n, v = len(data), data.n_views
    result = TrainResult("cisp_clipcond")
    t0 = __import__("time").perf_counter()
    base = CISP(cfg.model_config(embed_dim=clip.embed_dim)).to(device).train()

    def embed_clip(idx, views):
        with torch.no_grad():
            return clip.encode_image(_image_batch(data, idx, views).to(device)).float()

    result.losses = _train_denoiser(base, embed_clip, vox, n, v, cfg, device, rng_seed=cfg.seed + 1)
    result.wall_s = __import__("time").perf_counter() - t0
    base.eval()
    result.model = base  # type: ignore[attr-defined]
    if out_dir is not None:
        result.out_dir = str(base.save(out_dir))
    return result


def cli(args) -> int:
    from backend.models.clip import ClipModel
    from backend.training.cli import _load_data, _starter_dir
    from backend.training.common import record_model

    data = _load_data(args)
    root = _starter_dir(args)
    clip_dir = root / "clip"
    clip = ClipModel.load(clip_dir, device=args.device, text=False) if (clip_dir / "open_clip_config.json").is_file() else None
    cfg = CISPTrainConfig(seed=args.seed)
    if args.steps:  # the diffusion phase; the contrastive phase keeps the defaults' ratio (400 : 600)
        cfg.diffusion_steps = args.steps
        cfg.contrastive_steps = max(1, round(args.steps * 2 / 3))
    if args.batch:
        cfg.batch_size = args.batch
    if args.clip_only:
        if clip is None:
            raise FileNotFoundError(f"cisp --clip-only needs the starter CLIP in {clip_dir}; train it first")
        out = Path(args.out) if args.out else root / "cisp_clipcond"
        res = train_clipcond(data, cfg, clip, device=args.device, out_dir=out)
        print(res.summary())
        if not args.out:
            record_model("cisp_clipcond", out, args.seed,
                         "paper 002 baseline: the same voxel DDPM conditioned on the starter CLIP image embedding; "
                         + res.summary())
        return 0
    out = Path(args.out) if args.out else root / "cisp"
    clip_out = (out.parent / "cisp_clipcond") if clip is not None else None
    res = train_cisp(data, cfg, device=args.device, out_dir=out, clip=clip, clip_out_dir=clip_out)
    d = res.diffusion_losses  # type: ignore[attr-defined]
    res.metrics["diffusion_loss_first_last"] = f"{np.mean(d[:20]):.4f}->{np.mean(d[-20:]):.4f}"
    print(res.summary())
    if not args.out:
        record_model("cisp", out, args.seed, res.summary())
        if clip_out is not None:
            record_model("cisp_clipcond", clip_out, args.seed,
                         "paper 002 baseline: the same voxel DDPM conditioned on the starter CLIP image embedding")
    return 0
