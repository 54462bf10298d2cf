"""``python -m backend train <what> [options]``: make the starter data set and train the starter models.

Every command is reproducible from ``--seed`` and records the exact command line in the starter manifest.

    train world-preview --out world.png          a contact sheet of the procedural world (one shape per category)
    train dataset --out data/train.npz           render the training split (and --split heldout for evaluation)
    train clip --data data/train.npz             the starter CLIP (open_clip code, custom config)
    train classifier --data data/train.npz       the independent quality classifier (bench quality)
    train svr --data data/train.npz              the ISS SVR model (encoder E_S + implicit decoder D), 3D-supervised
    train svr --image-losses [--no-ssc]          ShapeClipper's image-supervised SVR with / without SSC (ablation)
    train mapper --data data/train.npz           the ISS stage-1 mapper M (Eq. 2) + background loss (Eq. 3) on D
    train prior --data data/train.npz            the diffusion prior f_T -> f_I
    train cisp --data data/train.npz             CISP embedding + conditioned voxel diffusion
    train diffusion --data data/train.npz        the pixel-space text-to-image model (SDS, DSD, theme galleries)
    train all                                     everything above, independent trainers in parallel processes
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from backend.errors import InputError

log = logging.getLogger("stepstone.training")

DEFAULT_DATA = Path("data/starter/train.npz")
DEFAULT_HELDOUT = Path("data/starter/heldout.npz")
DEFAULT_TEXT_CACHE = Path("data/starter/text_cache.npz")
WHATS = ("world-preview", "dataset", "clip", "classifier", "svr", "mapper", "prior", "cisp", "diffusion", "all")


def _starter_dir(args) -> Path:
    from backend.models.registry import starter_dir

    return Path(args.models) if args.models else starter_dir()


def _threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_world_preview(args) -> int:
    import numpy as np
    from PIL import Image as PILImage

    from backend.training.render_world import render_shape
    from backend.training.split import sample_shape
    from backend.training.world import CATEGORIES

    res = args.resolution
    tiles = []
    for k, cat in enumerate(CATEGORIES):
        seed = 0
        while True:  # first training shape of this category
            s = sample_shape(args.seed * 1000 + seed + 100 * k)
            seed += 1
            if s.category == cat:
                break
        out = render_shape(s, np.array([[35.0, 25.0, 1.6]]), res)
        tiles.append(out["rgb"][0])
        from backend.training.captions import caption

        print(f"{cat:9s} {caption(s)}")
    cols = 5
    rows = -(-len(tiles) // cols)
    sheet = np.ones((rows * res, cols * res, 3), np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * res:(r + 1) * res, c * res:(c + 1) * res] = t
    out_path = Path(args.out or "world_preview.png")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray((np.clip(sheet, 0, 1) * 255).astype(np.uint8)).save(out_path)
    print(f"wrote {out_path}")
    return 0


def cmd_dataset(args) -> int:
    from backend.training.dataset import DatasetConfig, build_dataset

    cfg = DatasetConfig(n_shapes=args.n, views=args.views, resolution=args.resolution, split=args.split,
                        seed=args.seed)
    out = Path(args.out or (DEFAULT_DATA if args.split == "train" else DEFAULT_HELDOUT))
    t0 = time.perf_counter()

    def progress(i, n):
        if i % 50 == 0 or i == n - 1:
            log.info("dataset %s: %d/%d shapes (%.0fs)", args.split, i + 1, n, time.perf_counter() - t0)

    data = build_dataset(cfg, progress=progress)
    data.save(out)
    print(f"wrote {out}: {len(data)} shapes x {cfg.views} views at {cfg.resolution}^2 in "
          f"{time.perf_counter() - t0:.1f}s ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _load_data(args, split: str = "train"):
    from backend.training.dataset import StarterDataset

    path = Path(args.data or (DEFAULT_DATA if split == "train" else DEFAULT_HELDOUT))
    return StarterDataset.load(path)


def cmd_clip(args) -> int:
    from backend.training.clip_trainer import ClipTrainConfig, train_clip
    from backend.training.common import record_model

    data = _load_data(args)
    cfg = ClipTrainConfig(seed=args.seed, text_cache=str(args.text_cache or DEFAULT_TEXT_CACHE))
    if args.steps:
        cfg.steps = args.steps
    if args.batch:
        cfg.batch_size = args.batch
    out = Path(args.out) if args.out else _starter_dir(args) / "clip"
    res = train_clip(data, cfg, device=args.device, out_dir=out)
    print(res.summary())
    if not args.out:
        record_model("clip", out, args.seed, f"{res.summary()}; data {len(data)} shapes x {data.n_views} views")
    return 0


def cmd_classifier(args) -> int:
    from backend.training.classifier import ClassifierConfig, accuracy, train_classifier
    from backend.training.common import record_model

    data = _load_data(args)
    cfg = ClassifierConfig(seed=args.seed if args.seed else ClassifierConfig.seed, grey_category=True)
    if args.steps:
        cfg.steps = args.steps
    if args.batch:
        cfg.batch_size = args.batch
    out = Path(args.out) if args.out else _starter_dir(args) / "classifier"
    res = train_classifier(data, cfg, device=args.device, out_dir=out)
    held = Path(args.heldout or DEFAULT_HELDOUT)
    if held.is_file():
        from backend.training.classifier import ShapeClassifier
        from backend.training.dataset import StarterDataset

        cat_acc, col_acc = accuracy(ShapeClassifier.load(out), StarterDataset.load(held))
        res.metrics.update(heldout_category_acc=cat_acc, heldout_colour_acc=col_acc)
    print(res.summary())
    if not args.out:
        record_model("classifier", out, cfg.seed, res.summary())
    return 0


def _dispatch(what: str):
    import importlib

    table = {
        "world-preview": cmd_world_preview, "dataset": cmd_dataset, "clip": cmd_clip, "classifier": cmd_classifier,
    }
    if what in table:
        return table[what]
    mod = {"svr": "backend.training.svr_trainer", "mapper": "backend.training.mapper_trainer",
           "prior": "backend.training.prior_trainer", "cisp": "backend.training.cisp_trainer",
           "diffusion": "backend.training.diffusion_trainer"}[what]
    return importlib.import_module(mod).cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend train", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=WHATS)
    p.add_argument("--data", default=None, help=f"training data set (default {DEFAULT_DATA})")
    p.add_argument("--heldout", default=None, help=f"held-out data set for evaluation (default {DEFAULT_HELDOUT})")
    p.add_argument("--out", default=None, help="output file/folder (default: the starter weights folder)")
    p.add_argument("--models", default=None, help="starter weights folder (default backend/models/starter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the config default)")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: the config default)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="stop every training loop after this many minutes and save what it has (0: no limit)")
    p.add_argument("--text-cache", default=None,
                   help=f"caption embeddings of the locked text tower, read and extended (default {DEFAULT_TEXT_CACHE}); "
                        "with every caption in it, training needs no text-tower weights")
    p.add_argument("--text-cache-only", action="store_true",
                   help="diffusion: only embed the training captions into --text-cache (needs the text tower), no training")
    # dataset options
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("-n", type=int, default=1040, help="dataset: number of shapes")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    # svr options
    p.add_argument("--image-losses", action="store_true",
                   help="svr: ShapeClipper's image-supervised trainer (paper 004) instead of the shipped 3D-supervised one")
    p.add_argument("--no-ssc", action="store_true", help="svr --image-losses: without ShapeClipper's semantic consistency")
    p.add_argument("--no-normal", action="store_true", help="svr: without the normal loss")
    p.add_argument("--clip-only", action="store_true",
                   help="cisp: train only paper 002's CLIP-conditioned baseline (cisp_clipcond)")
    p.add_argument("--keep-encoders", action="store_true",
                   help="cisp: keep the image/voxel encoders of the CISP in the output folder (skip the contrastive "
                        "phase) and retrain the voxel diffusion, and with a starter CLIP its CLIP-conditioned twin")
    p.add_argument("--cond-noise", type=float, default=None,
                   help="cisp: noise mixing of the condition in the voxel diffusion (xi ~ U(0, this); default 0)")
    p.add_argument("--image-backbone", choices=["vit", "clip"], default=None,
                   help="cisp: the image tower, the starter CLIP's image tower frozen with a trained residual head "
                        "(clip, default) or a small ViT trained from scratch (vit, the runs before session 7)")
    p.add_argument("--contrastive-steps", type=int, default=None,
                   help="cisp: steps of the contrastive phase (default: 2/3 of --steps)")
    p.add_argument("--no-baseline", action="store_true",
                   help="cisp: train CISP only; the CLIP-conditioned baseline (cisp_clipcond) stays as it is")
    p.add_argument("--keep-decoder", action="store_true",
                   help="mapper: train M only and leave the shipped SVR decoder as it is (skip the L_D + L_bg "
                        "fine-tuning of D, which an earlier `train mapper` already did)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from backend.training.common import pick_device

    args.device = pick_device(args.device)
    _threads(args)
    from backend.training.common import set_deadline

    set_deadline(args.minutes)
    if args.what == "all":
        return run_all(args)
    try:
        return int(_dispatch(args.what)(args) or 0)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from exc


# ``train all``: stages of trainers; the trainers of one stage need only earlier stages, so they run side by side
# (one process each, the CPU threads shared out between them).
ALL_STAGES: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (("clip", ()), ("svr", ()), ("classifier", ())),
    (("mapper", ()),),
    (("prior", ()), ("cisp", ()), ("svr", ("--image-losses",)), ("svr", ("--image-losses", "--no-ssc")),
     ("diffusion", ())),
)


def run_all(args) -> int:
    """Data sets, then every model in dependency order; independent trainers of a stage run in parallel processes."""
    import copy
    import os
    import subprocess

    steps = [("dataset", dict(split="train", out=str(DEFAULT_DATA))),
             ("dataset", dict(split="heldout", out=str(DEFAULT_HELDOUT), n=52))]
    for what, extra in steps:
        a = copy.copy(args)
        a.what = what
        for k, v in extra.items():
            setattr(a, k, v)
        if not Path(a.out).is_file():
            _dispatch(what)(a)
    cores = os.cpu_count() or 1
    t_all = time.perf_counter()
    for stage in ALL_STAGES:
        procs = []
        threads = args.threads or max(1, cores // len(stage))
        for what, extra in stage:
            cmd = [sys.executable, "-m", "backend", "train", what, "--seed", str(args.seed), "--device", args.device,
                   "--threads", str(threads), *extra]
            if args.models:
                cmd += ["--models", args.models]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            log.info("train all: %s", " ".join(cmd[2:]))
            procs.append((what, subprocess.Popen(cmd)))
        failed = [what for what, p in procs if p.wait() != 0]
        if failed:
            raise InputError(f"train all: {', '.join(failed)} failed (see the log above); the models trained so far "
                             "are saved")
        log.info("train all: stage %s done after %.0fs", "+".join(w for w, _ in stage), time.perf_counter() - t_all)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
