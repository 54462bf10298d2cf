"""Stage-1 alignment of ISS++ (paper 000, Sec. 3.3.1, Fig. 3a): the mapper M and the background loss for D.

- Mapper M (12 FC + LeakyReLU, :class:`backend.models.mapper.Mapper`) regresses the frozen SVR latent from the
  frozen CLIP image feature, Eq. 2: ``L_M = sum_i ||E_S(I_i) - M(f_I,i)||^2``.
- Noise mixing: the CLIP image feature is perturbed before it enters M, ``f' = normalize(f_I + xi * eps / |eps|)``
  with ``xi ~ U(0, noise_max)`` per sample (a Gaussian direction), so M also maps the neighbourhood of the image
  features, where the text features f_T land (the image/text gap of Sec. 3.2.2). This follows the feature
  perturbation of the official ISS training code and of LAFITE; the exact schedule there is not given in the
  paper, so ``noise_max`` is our choice (stated simplification).
- Decoder D is fine-tuned with ``L_D + lambda_bg L_bg`` (Eq. 3, lambda_bg = 10, Sec. 4.2): L_D is the SVR's own
  occupancy/colour loss, and ``L_bg = sum_p ||D_c(p) - 1||^2`` over points p on camera rays that miss the object
  (background pixels of the data set's masks), so the background renders white. Gradients of L_D and L_bg never
  reach M (Fig. 3a: stop-gradient), and L_M never reaches D or E_S.
- **Caption pairs (our addition, stated departure from ISS)**: ISS trains M on image features only because it
  has no paired text-shape data; the procedural world gives captions for free. With ``text_pairs = p`` a fraction
  p of every batch is (CLIP text feature f_T of a caption of shape i, E_S(I) of a random view of shape i): the
  same Eq. 2 regression, on the features M actually receives at test time, so the image/text gap no longer rests
  on noise mixing alone. The captions are the starter CLIP's (canonical + attribute-dropped, see
  :func:`backend.training.clip_trainer.caption_table`), embedded once through a
  :class:`~backend.training.text_cache.TextCache`. ``text_pairs = 0`` is ISS's text-free training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.training.common import StepLogger, TrainResult, seed_everything
from backend.training.dataset import StarterDataset
from backend.training.svr_trainer import white_images

log = logging.getLogger(__name__)


@dataclass
class MapperTrainConfig:
    hidden: int = 256
    n_layers: int = 12  # ISS Sec. 3.3.1
    steps: int = 8000  # 1000 until session 5: ~10 s of CPU, M was undertrained ("a table" came out an airplane)
    batch_size: int = 128
    lr: float = 5e-4  # ISS uses 1e-4 for 400 epochs; a shorter CPU schedule needs a larger step
    lambda_m: float = 0.5  # ISS Sec. 4.2
    noise_max: float = 1.0  # xi of the feature perturbation (noise mixing)
    text_pairs: float = 0.5  # fraction of a batch that is (caption feature, shape latent); 0 = ISS (image only)
    text_noise_max: float = 0.3  # xi for the caption features (they are what M sees at test time)
    captions_per_shape: int = 6
    text_cache: str = ""  # TextCache file of caption embeddings ("" = embed in memory)
    decoder_steps: int = 100  # fine-tuning of D with L_D + lambda_bg L_bg
    decoder_lr: float = 2e-4
    lambda_bg: float = 10.0  # ISS Sec. 4.2
    bg_rays: int = 256
    bg_points_per_ray: int = 8
    latent_basis: int = 32  # principal directions of the SVR latents stored with M (MapperConfig.latent_basis)
    seed: int = 0


@torch.no_grad()
def encode_dataset(data: StarterDataset, clip, svr, device: str = "cpu", batch: int = 256):
    """CLIP image features f_I (N*V, D) and SVR latents f_S = E_S(I) (N*V, L) of every render (white bg)."""
    f_all, z_all = [], []
    n, v = len(data), data.n_views
    flat = [(i, k) for i in range(n) for k in range(v)]
    for s in range(0, len(flat), batch):
        chunk = flat[s:s + batch]
        imgs = white_images(data, np.array([c[0] for c in chunk]), np.array([c[1] for c in chunk])).to(device)
        f_all.append(clip.encode_image(imgs).float().cpu())
        z_all.append(svr.encode(imgs).float().cpu())
    return torch.cat(f_all), torch.cat(z_all)


def caption_features(data: StarterDataset, clip, cfg: MapperTrainConfig):
    """Unit-norm CLIP text features of every training shape's captions: ``(emb (U, D), index (N, K+1))``."""
    from backend.training.clip_trainer import caption_table
    from backend.training.text_cache import TextCache

    rng = np.random.default_rng(cfg.seed + 7)
    _, index, uniq = caption_table(data, cfg.captions_per_shape, rng)
    tower = (clip.model_cfg.get("text_cfg", {}) or {}).get("hf_model_name") or clip.name
    cache = TextCache(str(tower), "pooled", cfg.text_cache or None)
    encode = None
    if cache.missing(uniq):
        def encode(caps):
            with torch.no_grad():
                return clip.encode_text(caps).float().cpu().numpy()
    emb = torch.from_numpy(cache.embed(uniq, encode))
    cache.save()
    return emb, index


def perturb(f: torch.Tensor, noise_max: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """``normalize(f + xi * eps/|eps|)``, ``xi ~ U(0, noise_max)`` per row (noise mixing of the CLIP feature)."""
    if noise_max <= 0:
        return f
    gdev = gen.device if gen is not None else f.device  # a CPU generator also serves features on a GPU
    eps = F.normalize(torch.randn(f.shape, generator=gen, device=gdev).to(f.device), dim=-1)
    xi = torch.rand(f.shape[0], 1, generator=gen, device=gdev).to(f.device) * noise_max
    return F.normalize(f + xi * eps, dim=-1)


def background_loss(svr, z: torch.Tensor, data: StarterDataset, idx, views, cfg: MapperTrainConfig,
                    rng: np.random.Generator) -> torch.Tensor:
    """ISS++ Eq. 3: colour of D at points on rays that miss the object is pushed to white (1)."""
    from backend.render import camera_rays, ray_box
    from backend.training.render_world import cameras_from_array

    pts_all = []
    for i, k in zip(idx, views):
        cam = cameras_from_array(data.cameras[i, k:k + 1])
        h = data.mask.shape[-1]
        o, d = camera_rays(cam, h, h)
        bg = np.flatnonzero(data.mask[i, k].reshape(-1) == 0)
        if len(bg) == 0:
            pts_all.append(torch.zeros(cfg.bg_rays * cfg.bg_points_per_ray, 3))
            continue
        pick = torch.from_numpy(rng.choice(bg, size=cfg.bg_rays, replace=len(bg) < cfg.bg_rays))
        o, d = o.reshape(-1, 3)[pick], d.reshape(-1, 3)[pick]
        t0, t1, hit = ray_box(o, d)
        u = torch.from_numpy(rng.random((cfg.bg_rays, cfg.bg_points_per_ray)).astype(np.float32))
        t = t0[:, None] + (t1 - t0).clamp_min(0)[:, None] * u
        p = (o[:, None] + d[:, None] * t[..., None]).clamp(-0.5, 0.5)
        pts_all.append(p.reshape(-1, 3))
    pts = torch.stack(pts_all).to(z.device)
    _, rgb = svr.decode(pts, z)
    return ((rgb - 1.0) ** 2).sum(-1).mean()


def train_mapper(data: StarterDataset, clip, svr, cfg: MapperTrainConfig, device: str = "cpu",
                 out_dir: str | Path | None = None, svr_out_dir: str | Path | None = None) -> TrainResult:
    """Stage 1: train M with Eq. 2 (noise-mixed CLIP image features), then fine-tune D with L_D + L_bg (Eq. 3)."""
    from backend.models.mapper import Mapper, MapperConfig

    seed_everything(cfg.seed)
    svr = svr.to(device)
    svr.eval()
    f_img, z_img = encode_dataset(data, clip, svr, device)
    mapper = Mapper(MapperConfig(in_dim=f_img.shape[1], out_dim=z_img.shape[1], hidden=cfg.hidden,
                                 n_layers=cfg.n_layers, latent_basis=cfg.latent_basis)).to(device).train()
    if cfg.latent_basis > 0:
        mapper.fit_latent_basis(z_img)
    opt = torch.optim.Adam(mapper.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult("mapper")
    logger = StepLogger(result, cfg.steps, every=100)
    f_img, z_img = f_img.to(device), z_img.to(device)
    n_txt = int(round(cfg.batch_size * cfg.text_pairs)) if cfg.text_pairs > 0 else 0
    if n_txt:
        cap_emb, cap_index = caption_features(data, clip, cfg)
        cap_emb = cap_emb.to(device)
    n_views = data.n_views
    for step in range(cfg.steps):
        b = torch.randint(0, len(f_img), (cfg.batch_size - n_txt,), generator=gen).to(device)
        f = perturb(f_img[b], cfg.noise_max, None)
        z = z_img[b]
        if n_txt:  # caption pairs: f_T of a caption of shape i -> E_S of a random view of shape i
            i = torch.randint(0, len(data), (n_txt,), generator=gen)
            c = torch.randint(0, cap_index.shape[1], (n_txt,), generator=gen)
            k = torch.randint(0, n_views, (n_txt,), generator=gen)
            rows = torch.as_tensor(cap_index[i.numpy(), c.numpy()], device=device)
            f = torch.cat([f, perturb(cap_emb[rows], cfg.text_noise_max, None)])
            z = torch.cat([z, z_img[(i * n_views + k).to(device)]])
        loss = cfg.lambda_m * mapper.regression_loss(f, z)  # Eq. 2 (z detached inside)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if logger(step, loss.item()):
            break
    mapper.eval()
    # --- decoder fine-tuning with L_D + lambda_bg L_bg (Eq. 3); M and E_S frozen (stop-gradient, Fig. 3a)
    rng = np.random.default_rng(cfg.seed + 1)
    svr.train()
    svr.encoder.requires_grad_(False)
    dopt = torch.optim.Adam(svr.decoder.parameters(), lr=cfg.decoder_lr)
    n, v = len(data), data.n_views
    bg_losses: list[float] = []
    d_losses: list[float] = []
    for step in range(cfg.decoder_steps):
        idx = rng.integers(0, n, size=8)
        views = rng.integers(0, v, size=8)
        with torch.no_grad():
            z = svr.encode(white_images(data, idx, views).to(device))
        pick = rng.integers(0, data.points.shape[1], size=512)
        pts = torch.from_numpy(data.points[idx][:, pick].astype(np.float32)).to(device)
        inside = torch.from_numpy(np.stack([np.unpackbits(data.inside[i])[: data.points.shape[1]][pick]
                                            for i in idx]).astype(np.float32)).to(device)
        logits, rgb = svr.decode(pts, z)
        gt_rgb = torch.stack([torch.from_numpy(data.shape(int(i)).sdf.color(data.points[i][pick].astype(np.float32)))
                              for i in idx]).to(device)
        w = inside[..., None]
        l_d = F.binary_cross_entropy_with_logits(logits, inside) + ((rgb - gt_rgb).abs() * w).sum() / (
            w.sum() * 3).clamp_min(1.0)
        l_bg = background_loss(svr, z, data, idx, views, cfg, rng)
        loss = l_d + cfg.lambda_bg * l_bg
        dopt.zero_grad(set_to_none=True)
        loss.backward()
        dopt.step()
        bg_losses.append(l_bg.item())
        d_losses.append(loss.item())
        if step % 50 == 0:
            log.info("decoder step %d/%d L_D %.4f L_bg %.4f", step + 1, cfg.decoder_steps, l_d.item(), l_bg.item())
    svr.encoder.requires_grad_(True)
    svr.eval()
    result = logger.finish()
    result.decoder_losses = d_losses  # type: ignore[attr-defined]
    with torch.no_grad():
        d_img = (mapper(f_img) - z_img).norm(dim=-1).mean().item()
    result.metrics.update(d_MfI_fS=d_img, bg_first=float(np.mean(bg_losses[:5])) if bg_losses else 0.0,
                          bg_last=float(np.mean(bg_losses[-5:])) if bg_losses else 0.0)
    result.mapper = mapper  # type: ignore[attr-defined]
    result.svr = svr  # type: ignore[attr-defined]
    if out_dir is not None:
        result.out_dir = str(mapper.save(out_dir))
    if svr_out_dir is not None:
        svr.save(svr_out_dir)
    return result


def cli(args) -> int:
    from backend.models.clip import ClipModel
    from backend.models.svr import SVRModel
    from backend.training.cli import _load_data, _starter_dir
    from backend.training.common import record_model

    data = _load_data(args)
    root = _starter_dir(args)
    clip = ClipModel.load(root / "clip", device=args.device)
    svr = SVRModel.load(root / "svr", device=args.device)
    from backend.training.cli import DEFAULT_TEXT_CACHE

    cfg = MapperTrainConfig(seed=args.seed, text_cache=str(args.text_cache or DEFAULT_TEXT_CACHE))
    if args.steps:
        cfg.steps = args.steps
    if args.batch:
        cfg.batch_size = args.batch
    keep_decoder = bool(getattr(args, "keep_decoder", False))
    if keep_decoder:
        cfg.decoder_steps = 0
    out = Path(args.out) if args.out else root / "mapper"
    svr_out = None if args.out or keep_decoder else root / "svr"
    res = train_mapper(data, clip, svr, cfg, device=args.device, out_dir=out, svr_out_dir=svr_out)
    print(res.summary())
    if not args.out:
        record_model("mapper", out, args.seed, res.summary())
    if not args.out and not keep_decoder:
        old = __import__("backend.models.registry", fromlist=["read_manifest"]).read_manifest(root)
        prev = old["models"].get("svr", {})
        record_model("svr", root / "svr", int(prev.get("seed", args.seed)),
                     f"{prev.get('notes', '')}; decoder then fine-tuned with L_D + 10 L_bg (ISS Eq. 3) by "
                     f"`python -m backend train mapper --seed {args.seed}`",
                     command=prev.get("command"))
    return 0
