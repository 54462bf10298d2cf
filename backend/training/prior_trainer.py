"""Train the diffusion prior f_T -> f_{T->I} (ISS++ Sec. 3.3.3 / Eq. 5; DALL-E 2's prior) on the starter CLIP.

Pairs are (CLIP text embedding of a random caption of a training shape, CLIP image embedding of a random view of
that shape), training split only; the loss is :meth:`backend.models.prior.DiffusionPrior.loss` (x0-prediction
with classifier-free-guidance dropout). Embeddings are precomputed once: captions are drawn with attribute
dropout (:func:`backend.training.captions.random_caption`), ``captions_per_shape`` per shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backend.training.captions import random_caption
from backend.training.common import StepLogger, TrainResult, seed_everything
from backend.training.dataset import StarterDataset
from backend.training.mapper_trainer import encode_dataset

log = logging.getLogger(__name__)


@dataclass
class PriorTrainConfig:
    width: int = 192
    layers: int = 3
    heads: int = 4
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-4
    captions_per_shape: int = 4
    sample_steps: int = 16
    seed: int = 0


@torch.no_grad()
def text_embeddings(data: StarterDataset, clip, per_shape: int, rng: np.random.Generator, batch: int = 512):
    """(N, per_shape, D) CLIP text embeddings of random captions of every shape."""
    caps = [random_caption(data.shape(i), rng) for i in range(len(data)) for _ in range(per_shape)]
    out = [clip.encode_text(caps[s:s + batch]).float().cpu() for s in range(0, len(caps), batch)]
    return torch.cat(out).view(len(data), per_shape, -1)


def train_prior(data: StarterDataset, clip, cfg: PriorTrainConfig, device: str = "cpu",
                out_dir: str | Path | None = None, image_emb: torch.Tensor | None = None) -> TrainResult:
    from backend.models.prior import DiffusionPrior, PriorConfig

    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if image_emb is None:
        with torch.no_grad():
            from backend.training.svr_trainer import white_images

            n, v = len(data), data.n_views
            feats = []
            for i in range(0, n, 64):
                idx = np.repeat(np.arange(i, min(n, i + 64)), v)
                views = np.tile(np.arange(v), len(idx) // v)
                feats.append(clip.encode_image(white_images(data, idx, views).to(clip.device)).float().cpu())
            image_emb = torch.cat(feats).view(n, v, -1)
    txt = text_embeddings(data, clip, cfg.captions_per_shape, rng)
    prior = DiffusionPrior(PriorConfig(embed_dim=txt.shape[-1], width=cfg.width, layers=cfg.layers, heads=cfg.heads,
                                       sample_steps=cfg.sample_steps)).to(device).train()
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult("prior")
    logger = StepLogger(result, cfg.steps, every=100)
    n, v = image_emb.shape[:2]
    for step in range(cfg.steps):
        i = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        k = torch.randint(0, v, (cfg.batch_size,), generator=gen)
        c = torch.randint(0, cfg.captions_per_shape, (cfg.batch_size,), generator=gen)
        loss = prior.loss(txt[i, c].to(device), image_emb[i, k].to(device), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if logger(step, loss.item()):
            break
    result = logger.finish()
    prior.eval()
    with torch.no_grad():  # how close are the prior's samples to true image embeddings, vs the text itself?
        i = torch.arange(min(n, 128))
        t = txt[i, 0].to(device)
        s = prior.sample(t, generator=torch.Generator().manual_seed(cfg.seed))
        target = torch.nn.functional.normalize(image_emb[i].mean(1), dim=-1).to(device)
        result.metrics["cos_sample_image"] = float((s * target).sum(-1).mean())
        result.metrics["cos_text_image"] = float((torch.nn.functional.normalize(t, dim=-1) * target).sum(-1).mean())
    result.prior = prior  # type: ignore[attr-defined]
    if out_dir is not None:
        result.out_dir = str(prior.save(out_dir))
    return result


def cli(args) -> int:
    from backend.models.clip import ClipModel
    from backend.training.cli import _load_data, _starter_dir
    from backend.training.common import record_model

    data = _load_data(args)
    root = _starter_dir(args)
    clip = ClipModel.load(root / "clip", device=args.device)
    cfg = PriorTrainConfig(seed=args.seed)
    if args.steps:
        cfg.steps = args.steps
    if args.batch:
        cfg.batch_size = args.batch
    out = Path(args.out) if args.out else root / "prior"
    res = train_prior(data, clip, cfg, device=args.device, out_dir=out)
    print(res.summary())
    if not args.out:
        record_model("prior", out, args.seed, res.summary())
    return 0
