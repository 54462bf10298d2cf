"""Train the ISS SVR model (image encoder E_S + implicit decoder D) on the starter data set.

ISS++ (paper 000, Sec. 3) uses DVR [23] as its SVR model: E_S(I) -> z, D(p, z) -> (occupancy, colour), trained
with rendering losses from multi-view images. Here, per step and per training image I_i (one random view of a
shape):

- ``L_occ``: binary cross-entropy of D's occupancy at the data set's occupancy samples (DVR's optional 3D
  supervision; our world has exact ground truth) and an L1 colour loss at the inside samples;
- ``L_render`` (ShapeClipper Eq. 1-2, DVR's photometric + mask losses): the field D(., E_S(I_i)) is volume-rendered
  with the project's renderer from the camera of another view of the same shape and compared with that render:
  ``||I - I_hat||^2`` and ``1 - IoU(M, M_hat)``;
- optional ``L_N`` (ShapeClipper Eq. 4, beta = 5): ``beta ||N - N_hat||_1 - cos(N, N_hat)`` between rendered
  normals and the data set's normals, with **outlier dropout**: the ``normal_drop`` fraction of pixels with the
  highest loss in the batch is left out (ShapeClipper Sec. 3.3);
- optional **semantic shape consistency** ``L_SSC`` (ShapeClipper Eq. 3, Sec. 3.2): the K nearest neighbours of
  every training shape by CLIP image embedding (cosine) are pseudo extra views: the shape predicted from I_i is
  rendered from a neighbour's camera and must explain the neighbour's mask (and normals).

Two presets (issue 12):

- :func:`occupancy_preset` (what ``train svr`` ships): 3D supervision only, the ONet/DVR way: ``L_occ`` and the
  colour loss on many points of many shapes per step, plus DeepSDF's latent regulariser ``lambda_z |z|^2`` so the
  latent space stays compact for the mapper M. The world has exact SDFs, so this is the cheap and strong signal.
- the image-supervised configuration below (``train svr --image-losses``, with or without ``--no-ssc``): ShapeClipper's
  rendering, normal and SSC losses on top of a light occupancy term: the paper-004 method and its ablation.

Simplifications, stated: ShapeClipper predicts viewpoints and swaps the neighbour's *texture* code into the
rendering; our cameras are known and the decoder has one latent, so SSC supervises the neighbour's mask and
normals only (not its colours). Normals come from the data set (exact), not from an off-the-shelf estimator, so
outlier dropout guards against rendering-artefact pixels rather than estimator errors. Renders for the losses are
low resolution (``render_res``) to keep CPU training short.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from backend.training.common import StepLogger, TrainResult, seed_everything
from backend.training.dataset import StarterDataset

log = logging.getLogger(__name__)


@dataclass
class SVRTrainConfig:
    image_size: int = 64
    encoder_widths: tuple = (32, 64, 96, 128)
    latent_dim: int = 128
    decoder_hidden: int = 128
    decoder_blocks: int = 4
    pe_freqs: int = 3
    steps: int = 1000
    batch_size: int = 12
    points: int = 512  # occupancy samples per shape per step
    lr: float = 1e-3
    lambda_occ: float = 1.0
    lambda_color: float = 1.0
    lambda_render: float = 0.2  # the occupancy BCE must dominate: sigma = o / beta makes low o visible
    render_items: int = 1  # shapes per step that are volume-rendered
    render_res: int = 16
    render_samples: int = 32
    normal_loss: bool = True
    lambda_normal: float = 0.05
    normal_beta: float = 5.0  # ShapeClipper Eq. 4
    normal_drop: float = 0.1  # outlier dropout: fraction of highest-loss pixels left out
    ssc: bool = True
    ssc_k: int = 5  # neighbours per shape
    lambda_ssc: float = 0.1
    lambda_z: float = 0.0  # DeepSDF latent regulariser (occupancy preset: 1e-3)
    seed: int = 0

    def model_config(self):
        from backend.models.svr import SVRConfig

        return SVRConfig(image_size=self.image_size, encoder_widths=tuple(self.encoder_widths),
                         latent_dim=self.latent_dim, decoder_hidden=self.decoder_hidden,
                         decoder_blocks=self.decoder_blocks, pe_freqs=self.pe_freqs)


def occupancy_preset(**overrides) -> SVRTrainConfig:
    """The shipped SVR: 3D (occupancy + colour) supervision only, bigger batches, more steps (see the docstring)."""
    base = dict(steps=4000, batch_size=32, points=1024, lr=1e-3, lambda_render=0.0, render_items=0,
                normal_loss=False, ssc=False, lambda_z=1e-3, pe_freqs=4, encoder_widths=(16, 32, 64, 128))
    base.update(overrides)
    return SVRTrainConfig(**base)


def point_colours(data: StarterDataset) -> np.ndarray:
    """Exact colour (N, P, 3) uint8 of every occupancy sample: the colour of the nearest part of the shape."""
    out = np.zeros(data.points.shape, np.uint8)
    for i in range(len(data)):
        c = data.shape(i).sdf.color(data.points[i].astype(np.float32))
        out[i] = np.clip(np.asarray(c) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def white_images(data: StarterDataset, idx, views) -> torch.Tensor:
    """Renders (B, 3, H, W) in [0, 1] on white, as E_S sees them."""
    return torch.from_numpy(data.rgb[idx, views].astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def clip_neighbours(data: StarterDataset, clip, k: int, batch: int = 256) -> np.ndarray:
    """(N, k) indices of each shape's k nearest other shapes by CLIP image embedding of view 0 (cosine)."""
    feats = []
    for s in range(0, len(data), batch):
        idx = np.arange(s, min(len(data), s + batch))
        feats.append(clip.encode_image(white_images(data, idx, np.zeros(len(idx), int)).to(clip.device)).cpu())
    f = F.normalize(torch.cat(feats).float(), dim=-1)
    sim = f @ f.t()
    sim.fill_diagonal_(-2.0)
    k = min(k, len(data) - 1)
    return sim.topk(k, dim=-1).indices.numpy()


def _pool(a: np.ndarray, res: int) -> torch.Tensor:
    """(V, H, W[, C]) float array -> (V, res, res[, C]) by area averaging."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    chan = t.ndim == 4
    x = t.permute(0, 3, 1, 2) if chan else t[:, None]
    x = F.adaptive_avg_pool2d(x, res)
    return x.permute(0, 2, 3, 1) if chan else x[:, 0]


def soft_iou_loss(mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """ShapeClipper Eq. 2: ``1 - sum(M M_hat) / sum(M + M_hat - M M_hat)``."""
    inter = (mask * pred).sum()
    union = (mask + pred - mask * pred).sum().clamp_min(1e-6)
    return 1.0 - inter / union


def normal_loss(gt: torch.Tensor, pred: torch.Tensor, valid: torch.Tensor, beta: float, drop: float) -> torch.Tensor:
    """ShapeClipper Eq. 4 per pixel, ``beta |N - N_hat|_1 - cos(N, N_hat)``, averaged after outlier dropout."""
    if valid.sum() == 0:
        return pred.sum() * 0.0
    g, p = gt[valid], pred[valid]
    per = beta * (g - p).abs().sum(-1) - F.cosine_similarity(g, p, dim=-1, eps=1e-6)
    if drop > 0 and per.numel() > 10:
        keep = max(1, int(round(per.numel() * (1.0 - drop))))
        per = per.sort().values[:keep]  # drop the highest-loss pixels (outliers)
    return per.mean()


def render_latent(svr, z: torch.Tensor, cams: np.ndarray, res: int, samples: int, normals: bool):
    """Volume-render D(., z) for one latent (L,) from cameras (V, 3) with the project's renderer."""
    from backend.fields.adapters import DecoderField
    from backend.render import render
    from backend.training.render_world import cameras_from_array

    field = DecoderField(svr.decoder, z)
    return render(field, cameras_from_array(cams, device=str(z.device)), res, res, n_samples=samples,
                  background="white", stratified=True, normals="autograd" if normals else None)


def train_svr(data: StarterDataset, cfg: SVRTrainConfig, device: str = "cpu", out_dir: str | Path | None = None,
              clip=None, neighbours: Optional[np.ndarray] = None) -> TrainResult:
    """Train E_S and D; ``clip`` (a ClipModel) is needed for SSC unless ``neighbours`` are given."""
    from backend.models.svr import SVRModel

    seed_everything(cfg.seed)
    svr = SVRModel(cfg.model_config()).to(device).train()
    opt = torch.optim.Adam(svr.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    rng = np.random.default_rng(cfg.seed)
    n, v = len(data), data.n_views
    if cfg.ssc and neighbours is None:
        if clip is None:
            raise ValueError("semantic shape consistency needs a CLIP model (or precomputed neighbours)")
        neighbours = clip_neighbours(data, clip, cfg.ssc_k)
    colours = point_colours(data)
    inside_all = np.unpackbits(data.inside, axis=1)[:, : data.points.shape[1]].astype(bool)
    masks = data.mask.astype(np.float32) / 255.0
    normals = data.normal.astype(np.float32) / 127.0
    image_losses = cfg.render_items > 0 and (cfg.lambda_render > 0 or cfg.ssc or cfg.normal_loss)
    result = TrainResult(("svr-image" + ("" if cfg.ssc else "-no-ssc")) if image_losses else "svr-3d")
    logger = StepLogger(result, cfg.steps)
    for step in range(cfg.steps):
        idx = rng.integers(0, n, size=cfg.batch_size)
        views = rng.integers(0, v, size=cfg.batch_size)
        z = svr.encode(white_images(data, idx, views).to(device))
        # --- 3D occupancy + colour (DVR 3D supervision on the exact world)
        pick = rng.integers(0, data.points.shape[1], size=cfg.points)
        pts = torch.from_numpy(data.points[idx][:, pick].astype(np.float32)).to(device)
        inside = torch.from_numpy(inside_all[idx][:, pick].astype(np.float32)).to(device)
        logits, rgb = svr.decode(pts, z)
        loss_occ = F.binary_cross_entropy_with_logits(logits, inside)
        gt_rgb = torch.from_numpy(colours[idx][:, pick].astype(np.float32) / 255.0).to(device)
        w = inside[..., None]
        loss_col = ((rgb - gt_rgb).abs() * w).sum() / (w.sum() * 3).clamp_min(1.0)
        loss = cfg.lambda_occ * loss_occ + cfg.lambda_color * loss_col
        if cfg.lambda_z > 0:
            loss = loss + cfg.lambda_z * (z ** 2).sum(-1).mean()
        extra = {"occ": loss_occ.item(), "col": loss_col.item()}
        # --- rendering losses (own shape from another view; SSC from a neighbour's view)
        r = cfg.render_res
        loss_r = loss_n = loss_s = torch.zeros((), device=device)
        for b in range(min(cfg.render_items, cfg.batch_size)):
            i, other = int(idx[b]), int((views[b] + rng.integers(1, v)) % v) if v > 1 else int(views[b])
            out = render_latent(svr, z[b], data.cameras[i, other:other + 1], r, cfg.render_samples, cfg.normal_loss)
            m = _pool(masks[i, other:other + 1], r).to(device)
            img = _pool(data.rgb[i, other:other + 1].astype(np.float32) / 255.0, r).to(device)
            loss_r = loss_r + ((out["rgb"] - img) ** 2).mean() + soft_iou_loss(m, out["alpha"])
            if cfg.normal_loss:
                gn = _pool(normals[i, other:other + 1], r).to(device)
                gn = F.normalize(gn, dim=-1)
                valid = (m > 0.5) & (out["alpha"] > 0.5)
                loss_n = loss_n + normal_loss(gn, out["normal"], valid, cfg.normal_beta, cfg.normal_drop)
            if cfg.ssc and neighbours is not None:
                j = int(neighbours[i, rng.integers(neighbours.shape[1])])
                vj = int(rng.integers(v))
                out_j = render_latent(svr, z[b], data.cameras[j, vj:vj + 1], r, cfg.render_samples, cfg.normal_loss)
                mj = _pool(masks[j, vj:vj + 1], r).to(device)
                loss_s = loss_s + soft_iou_loss(mj, out_j["alpha"])
                if cfg.normal_loss:
                    gnj = F.normalize(_pool(normals[j, vj:vj + 1], r).to(device), dim=-1)
                    valid = (mj > 0.5) & (out_j["alpha"] > 0.5)
                    loss_s = loss_s + cfg.lambda_normal * normal_loss(gnj, out_j["normal"], valid, cfg.normal_beta,
                                                                      cfg.normal_drop)
        k = max(1, min(cfg.render_items, cfg.batch_size))
        loss = loss + (cfg.lambda_render * loss_r + cfg.lambda_normal * loss_n + cfg.lambda_ssc * loss_s) / k
        extra.update(render=loss_r.item() / k, ssc=loss_s.item() / k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if logger(step, loss.item(), **extra):
            break
    result = logger.finish()
    svr.eval()
    result.metrics["params_M"] = sum(p.numel() for p in svr.parameters()) / 1e6
    if out_dir is not None:
        result.out_dir = str(svr.save(out_dir))
    result.model = svr  # type: ignore[attr-defined]
    return result


@torch.no_grad()
def svr_iou(svr, data: StarterDataset, device: str = "cpu", view: int = 0, max_shapes: int | None = None) -> float:
    """Mean volumetric IoU of E_S -> D reconstructions from one view against the exact voxels (32^3 cells)."""
    from backend.training.dataset import grid_points

    svr.eval()
    res = data.voxel_res
    pts = torch.from_numpy(grid_points(res)).to(device)[None]
    ious = []
    n = len(data) if max_shapes is None else min(max_shapes, len(data))
    for i in range(n):
        z = svr.encode(white_images(data, np.array([i]), np.array([view])).to(device))
        logits, _ = svr.decode(pts, z)
        pred = (logits[0] > 0).cpu().numpy().reshape(res, res, res)
        gt = data.voxel_grid(i)
        ious.append((pred & gt).sum() / max(1, (pred | gt).sum()))
    return float(np.mean(ious))


def cli(args) -> int:
    from backend.models.clip import ClipModel
    from backend.training.cli import _load_data, _starter_dir
    from backend.training.common import record_model

    data = _load_data(args)
    if args.image_losses:  # ShapeClipper's method (paper 004) and its SSC ablation
        cfg = SVRTrainConfig(seed=args.seed, ssc=not args.no_ssc, normal_loss=not args.no_normal)
        name = "svr_ssc" if cfg.ssc else "svr_no_ssc"
    else:
        cfg = occupancy_preset(seed=args.seed)
        name = "svr"
    if args.steps:
        cfg.steps = args.steps
    if args.batch:
        cfg.batch_size = args.batch
    clip = None
    if cfg.ssc:
        clip = ClipModel.load(_starter_dir(args) / "clip", device=args.device, text=False)
    out = Path(args.out) if args.out else _starter_dir(args) / name
    res = train_svr(data, cfg, device=args.device, out_dir=out, clip=clip)
    held = Path(args.heldout) if args.heldout else None
    from backend.training.cli import DEFAULT_HELDOUT

    held = held or DEFAULT_HELDOUT
    if held.is_file():
        res.metrics["heldout_iou"] = svr_iou(res.model, StarterDataset.load(held), device=args.device)  # type: ignore[attr-defined]
    print(res.summary())
    if not args.out:
        record_model(name, out, args.seed, res.summary())
    return 0
