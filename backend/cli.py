"""Command line: ``python -m backend serve | run <workflow> | selftest | bench <name> | models ... | train ...``.

``run`` drives exactly the pipeline code the server drives, without sockets, with a progress bar, and writes the
final meshes as GLB files.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from backend.errors import StepstoneError
from backend.models.device import PRECISIONS

log = logging.getLogger("stepstone")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="model profile: starter (default), pretrained or tiny")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="mixed precision of the iterative stages: auto = TF32 + bf16 autocast on CUDA, fp32 on a CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output GLB file (or folder for several results)")


def _output_paths(out: str | None, names: list[str], default_stem: str) -> dict[str, Path]:
    """Map each final mesh name to a file: one result -> ``--out`` itself, several -> ``<stem>_<name>.glb``."""
    base = Path(out) if out else Path(f"{default_stem}.glb")
    if len(names) == 1 and base.suffix:
        return {names[0]: base}
    if base.suffix:
        return {n: base.with_name(f"{base.stem}_{n}{base.suffix}") for n in names}
    return {n: base / f"{n}.glb" for n in names}


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backend.events import Image, JobContext, MeshUpdate, Progress
    from backend.models.device import resolve_device
    from backend.models.registry import load_profile
    from backend.pipelines import get_workflow

    wf = get_workflow(args.workflow)
    params, inputs = wf.params_from_args(args)
    device = resolve_device(args.device)
    profile = load_profile(args.profile, device=device)
    if args.workflow == "stylize":  # quality presets that fit this machine (backend.presets)
        from backend.presets import apply_preset, check_memory

        params, preset = apply_preset(args.workflow, params, device)
        check_memory(args.workflow, params, preset, device)
    params = wf.validate(params, inputs, profile=profile)
    from backend.models.device import setup_precision

    ctx = JobContext(profile=profile, device=device, seed=args.seed, precision=setup_precision(device, args.precision))
    finals: dict[str, MeshUpdate] = {}
    images: list[Image] = []
    bar = None
    stage = None
    try:
        for ev in wf.run(params, inputs, ctx):
            if isinstance(ev, Progress):
                if ev.stage != stage or bar is None:
                    if bar is not None:
                        bar.close()
                    stage = ev.stage
                    bar = tqdm(total=max(ev.total, 1), desc=ev.stage, unit="it", file=sys.stderr, leave=True)
                bar.n = min(ev.step, bar.total)
                if ev.message:
                    bar.set_postfix_str(ev.message[:60], refresh=False)
                bar.refresh()
            elif isinstance(ev, MeshUpdate) and ev.final:
                finals[ev.name] = ev
            elif isinstance(ev, Image):
                images.append(ev)
    except KeyboardInterrupt:
        ctx.cancel.cancel("interrupted")
        print("\ncancelled", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if not finals:
        print("the workflow produced no final mesh", file=sys.stderr)
        return 1
    from backend.geometry.io import export_mesh

    paths = _output_paths(args.out, list(finals), args.workflow.replace("-", "_"))
    textures = {im.label: im.png for im in images}  # a textured final's info["texture"] names its image
    for name, ev in finals.items():
        path = paths[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        texture = textures.get(str(ev.info.get("texture"))) if ev.uvs is not None else None
        export_mesh(path, ev.vertices, ev.faces, ev.colors, uvs=ev.uvs, texture=texture)
        extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.info.items())
        print(f"wrote {path} ({len(ev.vertices)} vertices, {len(ev.faces)} faces) {extra}".rstrip())
    if images:
        img_dir = (paths[next(iter(paths))].parent) / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in im.label)[:60] or "image"
            (img_dir / f"{i:02d}_{safe}.png").write_bytes(im.png)
        print(f"wrote {len(images)} images to {img_dir}")
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    """Hand the rest of the command line to ``module.main(argv)`` (bench, models, train, serve, selftest)."""
    mod = importlib.import_module(module)
    return int(mod.main(argv) or 0)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser; ``only``: import just this workflow's module for its options (the others are
    listed without options, so ``run <workflow>`` does not import every workflow's dependencies)."""
    from backend.pipelines import WORKFLOWS, get_workflow

    p = argparse.ArgumentParser(prog="python -m backend", description="Stepstone backend")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the job server (ZeroMQ)", add_help=False)
    sub.add_parser("selftest", help="installation check: server + client + diagnostic job", add_help=False)
    sub.add_parser("bench", help="benchmarks: transport, render, models, text-to-shape, ...", add_help=False)
    sub.add_parser("models", help="list | check | download model weights", add_help=False)
    sub.add_parser("train", help="train the starter models", add_help=False)
    run = sub.add_parser("run", help="run a workflow without a server")
    wsub = run.add_subparsers(dest="workflow", required=True)
    for name in WORKFLOWS:
        wp = wsub.add_parser(name)
        _add_common(wp)
        if only is not None and name != only:
            continue
        try:
            get_workflow(name).add_arguments(wp)
        except ImportError as exc:  # a workflow whose module is missing is listed but unusable
            wp.description = f"unavailable: {exc}"
    return p


DELEGATES = {
    "serve": "backend.server",
    "selftest": "backend.selftest",
    "bench": "backend.bench",
    "models": "backend.models.cli",
    "train": "backend.training.cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if argv and argv[0] in DELEGATES:
            return _delegate(DELEGATES[argv[0]], argv[1:])
        only = argv[1] if len(argv) > 1 and argv[0] == "run" and not argv[1].startswith("-") else None
        args = build_parser(only).parse_args(argv)
        return cmd_run(args)
    except StepstoneError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
