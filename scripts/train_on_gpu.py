"""Train the starter models side by side on one lent GPU within a fixed time, and pack them for the trip home.

    python scripts/train_on_gpu.py --out OUTDIR --budget 330 [--data ...] [--heldout ...] [--text-cache ...]

Each trainer is first *probed* (100 steps, all trainers at once, as in the real run, so the GPU's sharing is
included), then run for as many steps as fit its share of ``--budget`` seconds; the step counts are printed and
recorded in the manifest entries, so the run is reproducible with ``python -m backend train <what> --device cuda
--steps N --batch B``. ``--minutes`` is passed as well, a safety net that stops a loop early (and saves) if the probe
was optimistic. The CLIP-conditioned voxel diffusion (paper 002's baseline) waits for the new CLIP, since it is
conditioned on that CLIP's image embeddings. The text tower's weights are not needed: every caption embedding comes
from the text cache made beforehand (``python -m backend train clip --steps 1 --out /tmp/x`` writes it).

Everything lands in ``OUTDIR/models/<name>`` and is packed into one ``OUTDIR/models_<name>.tar`` per model (a lent
machine may return only files of limited size; a session lost a run's weights to one 31 MB tar), plus
``OUTDIR/plan.json`` and ``OUTDIR/logs.tar``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PROBE_STEPS = 100
# name -> (train what, extra args, batch, share of the budget); "after" = starts when that job has finished
PLAN = {
    "clip": ("clip", [], 256, 0.45),
    "svr": ("svr", [], 64, 1.0),
    "classifier": ("classifier", [], 128, 0.6),
    "cisp": ("cisp", ["--no-baseline"], 128, 0.5),  # its image tower is the CLIP's: after the CLIP
    "cisp_clipcond": ("cisp", ["--clip-only"], 128, 0.5),
}
AFTER = {"cisp_clipcond": "clip", "cisp": "clip"}
SUMMARY = re.compile(r"(\d+) steps in ([\d.]+)s")


def cmd(name: str, steps: int, out: Path, args, minutes: float = 0.0) -> list[str]:
    what, extra, batch, _ = PLAN[name]
    c = [sys.executable, "-m", "backend", "train", what, "--device", args.device, "--steps", str(steps),
         "--batch", str(batch), "--data", args.data, "--heldout", args.heldout, "--threads", str(args.threads),
         "--out", str(out / name)] + extra
    if what == "clip":
        c += ["--text-cache", args.text_cache]
    if name in ("cisp_clipcond", "cisp"):  # the CLIP trained in this run, else the one in --clip-models
        c += ["--models", str(out) if "clip" in AFTER.values() else args.clip_models]
    if minutes:
        c += ["--minutes", f"{minutes:.2f}"]
    return c


def run_parallel(jobs: dict[str, list[str]], logs: Path, after: dict[str, str] | None = None) -> dict[str, str]:
    """Start the jobs (each waiting for its ``after`` job), wait for all; returns their stdout+stderr."""
    after = after or {}
    procs: dict[str, subprocess.Popen] = {}
    pending = dict(jobs)
    done: dict[str, str] = {}
    t0 = time.time()
    while pending or procs:
        for name in list(pending):
            dep = after.get(name)
            if dep is None or dep not in pending and dep not in procs:
                log = open(logs / f"{name}.log", "w")
                procs[name] = subprocess.Popen(pending.pop(name), stdout=log, stderr=subprocess.STDOUT)
                print(f"[{time.time() - t0:6.1f}s] started {name}", flush=True)
        for name, p in list(procs.items()):
            if p.poll() is not None:
                done[name] = (logs / f"{name}.log").read_text()
                print(f"[{time.time() - t0:6.1f}s] {name} exited {p.returncode}", flush=True)
                del procs[name]
        time.sleep(0.5)
    return done


def rate(text: str) -> float | None:
    """Seconds per step from a trainer's summary line(s): the largest (slowest) of the phases printed."""
    found = [(int(a), float(b)) for a, b in SUMMARY.findall(text)]
    r = [b / a for a, b in found if a > 0]
    return max(r) if r else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=330.0, help="seconds of training for a trainer of share 1")
    p.add_argument("--data", default="data/starter/train.npz")
    p.add_argument("--heldout", default="data/starter/heldout.npz")
    p.add_argument("--text-cache", default="data/starter/text_cache.npz")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=3)
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS)
    p.add_argument("--clip-models", default="backend/models/starter",
                   help="models folder whose clip/ conditions cisp_clipcond when clip is not trained in this run")
    p.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(PLAN))
    args = p.parse_args()
    out = Path(args.out)
    models, logs = out / "models", out / "logs"
    for d in (models, logs, out / "probe"):
        d.mkdir(parents=True, exist_ok=True)
    names = [n for n in PLAN if not args.only or n in args.only.split(",")]
    if "clip" not in names:
        AFTER.pop("cisp_clipcond", None)  # conditioned on (and reading through) the CLIP in --clip-models
        AFTER.pop("cisp", None)
    # 1. probe, all at once (clipcond probes on the shipped CLIP: same denoiser cost)
    probe = {}
    for n in names:
        c = cmd(n, args.probe_steps, out / "probe", args)
        if n in ("cisp_clipcond", "cisp"):
            c[c.index("--models") + 1] = args.clip_models
        probe[n] = c
    t = time.time()
    res = run_parallel(probe, logs)
    print(f"probe: {time.time() - t:.1f}s", flush=True)
    steps = {}
    for n in names:
        r = rate(res[n])
        if r is None:
            print(f"probe of {n} failed:\n{res[n][-3000:]}", flush=True)
            continue
        share = PLAN[n][3] * args.budget
        # cisp's contrastive phase is a fixed 150 head steps on cached CLIP features (seconds); the diffusion rules
        steps[n] = max(args.probe_steps, int(0.85 * share / r))
        print(f"{n}: {r * 1000:.1f} ms/step -> {steps[n]} steps (batch {PLAN[n][2]})", flush=True)
    if "cisp" in steps and "cisp_clipcond" in steps:  # paper 002's comparison: equal diffusion steps and batch
        steps["cisp_clipcond"] = steps["cisp"]
        print(f"cisp_clipcond: {steps['cisp']} steps, as many as cisp's voxel diffusion", flush=True)
    # 2. the real run
    share = {n: PLAN["cisp"][3] if n == "cisp_clipcond" else PLAN[n][3] for n in steps}
    jobs = {n: cmd(n, s, models, args, minutes=1.25 * share[n] * args.budget / 60) for n, s in steps.items()}
    t = time.time()
    res = run_parallel(jobs, logs, AFTER)
    print(f"training: {time.time() - t:.1f}s", flush=True)
    for n in jobs:
        last = [ln for ln in res[n].splitlines() if "steps in" in ln or "Error" in ln or "error" in ln]
        print(f"== {n}: {' | '.join(last[-3:])}", flush=True)
    (out / "plan.json").write_text(json.dumps({"steps": steps, "batch": {n: PLAN[n][2] for n in steps},
                                               "commands": {n: " ".join(c) for n, c in jobs.items()}}, indent=2))
    for n in jobs:  # one tar per model: a lent machine may return files of limited size (16 MiB each here)
        if (models / n).is_dir():
            with tarfile.open(out / f"models_{n}.tar", "w") as tf:
                tf.add(models / n, arcname=f"models/{n}")
    with tarfile.open(out / "logs.tar", "w") as tf:
        tf.add(logs, arcname="logs")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
