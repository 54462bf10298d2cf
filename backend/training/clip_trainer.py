"""Train the starter CLIP: open_clip's own ``CLIP`` model code with a small custom config, trained contrastively
on render/caption pairs of the procedural world (training split only).

The loss is CLIP's symmetric InfoNCE (Radford et al., as in open_clip's ``ClipLoss``) with one change: captions of
the world repeat (many shapes are "a red chair"), so pairs whose captions are identical are all positives (soft
targets spread evenly over them) instead of false negatives. Captions are drawn fresh every step with
:func:`backend.training.captions.random_caption` (attribute dropout), so every word is learnt on its own, and
renders get random backgrounds half of the time (ISS++ Sec. 3.4 renders on random backgrounds) and small random
shifts. The model is saved in open_clip's ``local-dir:`` layout (``open_clip_config.json`` +
``open_clip_model.safetensors``), the layout the registry's ``clip`` kind expects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from backend.training.captions import random_caption
from backend.training.common import StepLogger, TrainResult, seed_everything
from backend.training.dataset import StarterDataset

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipTrainConfig:
    embed_dim: int = 128
    image_size: int = 64
    vision_layers: int = 3
    vision_width: int = 128
    vision_head_width: int = 32
    patch_size: int = 8
    context_length: int = 24  # longest world caption is ~14 tokens
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 2
    steps: int = 400  # a CPU schedule: ~9 epochs of the 4160 training renders
    batch_size: int = 96
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 40
    random_background: float = 0.5  # probability of a random flat background colour instead of white
    max_shift: int = 4  # pixels of random translation
    seed: int = 0

    def model_cfg(self) -> dict:
        """The open_clip model config (the ``model_cfg`` of ``open_clip_config.json``)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                           "head_width": self.vision_head_width, "patch_size": self.patch_size},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


def build_clip(cfg: ClipTrainConfig):
    """A randomly initialised open_clip ``CLIP`` with the starter config, and its tokenizer."""
    import open_clip
    from open_clip.model import CLIP

    model = CLIP(**cfg.model_cfg())
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    return model, tokenizer


def save_clip(model, cfg: ClipTrainConfig, out_dir: str | Path) -> Path:
    """Write open_clip's ``local-dir:`` layout through :meth:`backend.models.clip.ClipModel.save`."""
    from backend.models.clip import ClipModel

    pre = {"size": cfg.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
           "interpolation": "bicubic", "resize_mode": "shortest"}
    wrapped = ClipModel(model.cpu(), cfg.model_cfg(), pre, name="stepstone-starter-clip", device="cpu")
    out = wrapped.save(out_dir)
    (Path(out) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return Path(out)


def load_trained_clip(folder: str | Path, device: str = "cpu"):
    """Load a folder written by :func:`save_clip` (open_clip ``local-dir:`` through ``ClipModel.load``)."""
    from backend.models.clip import ClipModel

    return ClipModel.load(folder, device=device)


def normalise(images, mean=OPENAI_MEAN, std=OPENAI_STD):
    """(B, 3, H, W) in [0, 1] -> CLIP's normalised input."""
    import torch

    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - m) / s


def augment(rgb, mask, rng: np.random.Generator, random_background: float, max_shift: int):
    """Composite renders (B, H, W, 3) uint8 + masks (B, H, W) uint8 over white or random backgrounds, shift them.

    Returns a float tensor (B, 3, H, W) in [0, 1].
    """
    import torch

    b = rgb.shape[0]
    a = mask.astype(np.float32)[..., None] / 255.0
    # renders are on white: recover the premultiplied colour and recomposite
    fg = rgb.astype(np.float32) / 255.0 - (1.0 - a)
    bg = np.ones((b, 1, 1, 3), np.float32)
    use = rng.random(b) < random_background
    bg[use] = rng.uniform(0, 1, size=(int(use.sum()), 1, 1, 3))
    img = np.clip(fg + (1.0 - a) * bg, 0, 1)
    if max_shift > 0:
        out = np.empty_like(img)
        for i in range(b):
            dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
            shifted = np.roll(img[i], (int(dy), int(dx)), axis=(0, 1))
            out[i] = shifted
        img = out
    return torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()


def contrastive_loss(img_f, txt_f, logit_scale, captions: list[str]):
    """Symmetric InfoNCE with identical captions as shared positives (soft targets)."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * img_f @ txt_f.t()
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    lab = torch.as_tensor([ids[c] for c in captions], device=logits.device)
    same = (lab[:, None] == lab[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def train_clip(data: StarterDataset, cfg: ClipTrainConfig, device: str = "cpu", out_dir: str | Path | None = None,
               model=None) -> TrainResult:
    """Contrastive training on (render, caption) pairs; saves to ``out_dir`` when given."""
    import torch

    seed_everything(cfg.seed)
    if data.split != "train":
        raise ValueError("the starter CLIP trains on the training split only")
    if model is None:
        model, tokenizer = build_clip(cfg)
    else:
        import open_clip

        tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
    rng = np.random.default_rng(cfg.seed)
    shapes = [data.shape(i) for i in range(len(data))]
    n, v = len(data), data.n_views
    result = TrainResult("clip")
    logger = StepLogger(result, cfg.steps)
    for step in range(cfg.steps):
        idx = rng.integers(0, n, size=min(cfg.batch_size, n * v))
        views = rng.integers(0, v, size=len(idx))
        imgs = augment(data.rgb[idx, views], data.mask[idx, views], rng, cfg.random_background, cfg.max_shift)
        if imgs.shape[-1] != cfg.image_size:
            imgs = torch.nn.functional.interpolate(imgs, size=cfg.image_size, mode="bilinear", antialias=True)
        caps = [random_caption(shapes[i], rng) for i in idx]
        tokens = tokenizer(caps).to(device)
        img_f = torch.nn.functional.normalize(model.encode_image(normalise(imgs.to(device))), dim=-1)
        txt_f = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp().clamp(max=100), caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        logger(step, loss.item())
    result = logger.finish()
    model.eval()
    if out_dir is not None:
        result.out_dir = str(save_clip(model, cfg, out_dir))
    result.metrics["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    return result
