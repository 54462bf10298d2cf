"""Benchmark: where artists wait (issue 15): ``python -m backend bench speed [--rows ...] [--threads N]``.

Every row of issue 15's table, measured in this one run against the previous code path as the baseline (ratio
printed as baseline / new), on the CPU always and on CUDA when there is a device; a row that cannot be measured
here says why.

CPU rows (starter profile, the README's main job):

- ``main-job``: ``python -m backend run text-to-shape --prompt "a tall red chair" --out ...`` as a subprocess,
  command to GLB: wall seconds, user+sys CPU seconds (less disturbed by other processes than wall time), peak RSS
  and minor page faults. Baseline: the same command on the previous path, i.e. without bytecode (``-X
  pycache_prefix`` pointing at an empty folder: what every run paid where ``.pyc`` files are not written, and the
  first run of a fresh clone), OpenMP threads spinning at barriers (libgomp's default wait policy; now PASSIVE,
  set in ``backend/__init__.py``), importing every workflow to build the CLI parser, stage 2's grid decoded with
  plain autograd in one chunk and rendered in 8 k-ray chunks, and the final mesh decoded densely in 131 k-point
  chunks, with the preview meshes `run` used to decode every 5 iterations and never showed.
- ``final-mesh``: the 128^3 marching-cubes mesh of the stage-1 shape, dense in 131 k chunks (baseline) vs
  coarse-to-fine (:mod:`backend.fields.sparse_grid`); the two meshes are compared vertex by vertex.
- ``stage2``: seconds per stage-2 iteration for each preset's settings, and a whole stage 2 (standard preset) on the
  previous path (autograd through the frozen decoder for the 32^3 grid, one chunk) and the new one
  (:mod:`backend.fields.frozen_decoder`, 8 k chunks), with the two resulting shapes compared. The guard that
  stops stage 2 early is off here so every iteration does the full work.
- ``ready`` and ``preview``: a real ``serve`` process over ZeroMQ: from the connection file (the backend prints
  ready) to the first preview mesh of a text-to-shape job submitted at once (models loading or preloaded), and the
  first preview of a second job on the warm backend (press Generate -> first preview; the add-on's poll loop adds
  at most one timer tick). Baseline: ``serve --no-preload``.
- ``presets``: each text-to-shape preset's expected seconds on this device (fixed costs measured in ``main-job``
  + iterations x measured seconds per iteration + final mesh); the paper preset's iteration is measured at one
  view and scaled by its 10 views. Stylize and gallery presets: the table in :mod:`backend.presets`.

CUDA rows (only with a device): stage 2 at the paper's settings with full-size random-weight models (baseline: fp32
with 8 k-ray chunks, the path before issue 15; new: the jobs' CUDA default, TF32 + bf16 autocast with 32 k-ray
checkpointed chunks), and the stylize benchmark's GPU part (fp32 vs the same default, with a torch.profiler table). The theme gallery row is not measured: the full-size gallery models cannot be fetched here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

print = functools.partial(print, flush=True)  # noqa: A001

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a tall red chair"
ROWS = ("main-job", "final-mesh", "stage2", "ready", "presets", "cuda")
NO_CUDA = "not measured: no CUDA device"


def _ratio(base: float, new: float) -> str:
    return f"x{base / new:.2f}" if new > 0 else "-"


# --------------------------------------------------------------------------------------------- subprocess runs


def _baseline_main(argv: list[str]) -> int:
    """``python -m backend`` on the previous path: every workflow imported for the parser, dense final meshes."""
    from backend import cli
    from backend.pipelines import iss_stages, text_to_shape

    dense = functools.partial(iss_stages.decoder_mesh, sparse=False)
    grid = iss_stages.occupancy_logit_grid
    iss_stages.occupancy_logit_grid = functools.partial(grid, chunk=131072)
    text_to_shape.decoder_mesh = dense
    orig = cli.build_parser
    cli.build_parser = lambda only=None: orig(None)
    _PreviousStage2Path().__enter__()
    if argv[:2] == ["run", "text-to-shape"] and "--preview-every" not in argv:
        argv = [*argv, "--preview-every", "5"]  # `run` used to decode a preview mesh every 5 iterations
    return cli.main(argv)


def _run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; wall seconds, user+sys CPU seconds, peak RSS (MB) and minor faults of the child."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{out[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024, "minflt": ru.ru_minflt,
            "out": out}


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def row_main_job(threads: int | None, work: Path) -> dict:
    args = ["run", "text-to-shape", "--prompt", PROMPT, "--profile", "starter", "--device", "cpu"]
    env = _env(threads)
    empty = work / "no-bytecode"
    empty.mkdir(exist_ok=True)
    base_cmd = [sys.executable, "-X", f"pycache_prefix={empty}", "-c",
                "import sys; from backend.bench.speed import _baseline_main; sys.exit(_baseline_main(sys.argv[1:]))",
                *args, "--out", str(work / "chair_baseline.glb")]
    new_cmd = [sys.executable, "-m", "backend", *args, "--out", str(work / "chair.glb")]
    # libgomp's default wait policy (spin, then sleep): an empty value is not a policy, and backend/__init__.py
    # only fills in PASSIVE where the variable is absent
    base = _run_measured(base_cmd, dict(env, OMP_WAIT_POLICY=""))
    new = _run_measured(new_cmd, env)
    for label, r in (("baseline", base), ("new", new)):
        print(f"  {label:8s} command to GLB {r['wall']:6.1f} s wall, {r['cpu']:6.1f} s user+sys, peak RSS "
              f"{r['rss_mb']:6.0f} MB, {r['minflt'] / 1e6:5.2f} M minor faults")
    print(f"  ratio    wall {_ratio(base['wall'], new['wall'])}, CPU {_ratio(base['cpu'], new['cpu'])}, "
          f"RSS {_ratio(base['rss_mb'], new['rss_mb'])}   (goal: <= 20 s, <= 1 GB)")
    same = _same_glb(work / "chair_baseline.glb", work / "chair.glb")
    print(f"  result   {same}")
    # fixed costs of a job (for the presets row): imports + loading = wall - the job's own progress time
    return {"base": base, "new": new}


def _same_glb(a: Path, b: Path) -> str:
    import numpy as np
    import trimesh

    ma, mb = trimesh.load(a, force="mesh"), trimesh.load(b, force="mesh")
    if ma.vertices.shape != mb.vertices.shape:
        return f"meshes differ: {len(ma.vertices)} vs {len(mb.vertices)} vertices"
    d = float(np.abs(np.asarray(ma.vertices) - np.asarray(mb.vertices)).max())
    return f"same mesh as the baseline: {len(ma.vertices)} vertices, max vertex difference {d:.2e}"


# --------------------------------------------------------------------------------------------- in-process rows


def _starter():
    from backend.models.registry import load_profile

    profile = load_profile("starter", device="cpu")
    return profile, profile.clip(), profile.mapper(), profile.svr()


def row_final_mesh() -> float:
    import numpy as np
    import torch

    from backend.pipelines.iss_stages import decoder_mesh, occupancy_logit_grid, stage1_latent

    _, clip, mapper, svr = _starter()
    with torch.no_grad():
        z = stage1_latent(mapper, clip.encode_text([PROMPT]))
    import backend.pipelines.iss_stages as S

    orig = S.occupancy_logit_grid
    S.occupancy_logit_grid = functools.partial(occupancy_logit_grid, chunk=131072)
    try:
        t = time.perf_counter()
        dense = decoder_mesh(svr.decoder, z, 128, sparse=False)
        td = time.perf_counter() - t
    finally:
        S.occupancy_logit_grid = orig
    t = time.perf_counter()
    sparse = decoder_mesh(svr.decoder, z, 128)
    ts = time.perf_counter() - t
    same = dense[0].shape == sparse[0].shape and float(np.abs(dense[0] - sparse[0]).max()) < 1e-4
    print(f"  baseline dense 128^3, 131k chunks {td:6.2f} s | new coarse-to-fine {ts:6.2f} s | {_ratio(td, ts)} | "
          f"{'same mesh' if same else 'MESHES DIFFER'} ({len(sparse[0])} vertices)")
    return ts


def _stage2_seconds(clip, mapper, decoder, cfg, device: str = "cpu", iterations: int = 3, autocast=None) -> float:
    import torch

    from backend.pipelines.iss_stages import Stage2Aligner

    with torch.no_grad():
        f = clip.encode_text([PROMPT]).to(device)
    cfg = replace(cfg, min_volume=0.0)
    al = Stage2Aligner(mapper, decoder, clip, f, f[0], cfg, torch.Generator().manual_seed(0), device)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    with ctx():
        terms = al.step()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iterations):
            terms = al.step()
        if device == "cuda":
            torch.cuda.synchronize()
    bad = [k for k, v in terms.items() if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        print(f"  WARNING: non-finite stage-2 terms {bad}")
    return (time.perf_counter() - t) / iterations


class _PreviousStage2Path:
    """Stage 2 as before issue 15: autograd through the frozen decoder for the grid (one 65 k-point chunk) and
    render chunks of ``ViewConfig.chunk`` rays whatever their sample count."""

    def __enter__(self):
        import backend.fields.adapters as AD
        import backend.fields.frozen_decoder as FD
        import backend.render.volume as V

        self._saved = (FD.applies, AD.CachedDecoderField.__init__.__defaults__, V.CPU_CHUNK_SAMPLES)
        FD.applies = lambda decoder, z: False
        d = list(self._saved[1])
        d[-1] = 65536
        AD.CachedDecoderField.__init__.__defaults__ = tuple(d)
        V.CPU_CHUNK_SAMPLES = 1 << 62
        return self

    def __exit__(self, *exc):
        import backend.fields.adapters as AD
        import backend.fields.frozen_decoder as FD
        import backend.render.volume as V

        FD.applies, AD.CachedDecoderField.__init__.__defaults__, V.CPU_CHUNK_SAMPLES = self._saved


def row_stage2_compare(iterations: int = 20) -> None:
    """A whole stage 2 (standard preset, guard off) on the previous and the new path: time, peak RSS growth, and
    the resulting shapes compared (latent, occupancy IoU at 64^3)."""
    import resource

    import torch

    from backend.pipelines import text_to_shape as t2s
    from backend.pipelines.iss_stages import Stage2Aligner, occupancy_logit_grid

    _, clip, mapper, svr = _starter()
    with torch.no_grad():
        f = clip.encode_text([PROMPT])
    cfg = replace(t2s.stage2_config(t2s.validate({"prompt": PROMPT}, []), "cpu"), min_volume=0.0)
    res = {}
    for label in ("baseline", "new"):
        with (_PreviousStage2Path() if label == "baseline" else contextlib.nullcontext()):
            al = Stage2Aligner(mapper, svr.decoder, clip, f, f[0], cfg, torch.Generator().manual_seed(0))
            t = time.perf_counter()
            for _ in range(iterations):
                al.step()
            el = time.perf_counter() - t
        with torch.no_grad():
            z = al.latent()
        res[label] = (el, z, occupancy_logit_grid(svr.decoder, z, 64) > 0,
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    (tb, zb, gb, mb), (tn, zn, gn, mn) = res["baseline"], res["new"]
    iou = float((gb & gn).sum() / max(1, (gb | gn).sum()))
    print(f"  whole stage 2, {iterations} iterations (standard): baseline {tb:5.1f} s | new {tn:5.1f} s | "
          f"{_ratio(tb, tn)} | same shape: latent rel. diff {float((zb - zn).norm() / zb.norm()):.1e}, "
          f"occupancy IoU {iou:.4f} (Adam turns float noise into lr-sized steps: IoU >= 0.99 expected)")


def row_stage2(iterations: int) -> dict:
    from backend.pipelines import text_to_shape as t2s
    from backend.presets import TEXT_TO_SHAPE

    _, clip, mapper, svr = _starter()
    out = {}
    for preset in ("draft", "standard", "paper"):
        params = {k: v for k, v in TEXT_TO_SHAPE[preset].items() if k in ("iterations", "views", "render_resolution",
                                                                           "n_samples", "field_grid")}
        scale = 1.0
        if preset == "paper":  # 10 views at 90^2 with the decoder at every sample: one view, times 10
            scale = params["views"]
            params = dict(params, views=1)
        cfg = t2s.stage2_config(t2s.validate(dict(params, prompt=PROMPT), []), "cpu")
        sec = _stage2_seconds(clip, mapper, svr.decoder, cfg, iterations=iterations if preset != "paper" else 1)
        out[preset] = sec * scale
        note = f" (1 view measured, x{scale:.0f} views)" if scale != 1 else ""
        print(f"  stage-2 iteration, {preset:8s} ({cfg.views if scale == 1 else int(scale)} views at "
              f"{cfg.view.resolution}^2, {cfg.view.n_samples} samples, field grid {cfg.view.field_grid}): "
              f"{sec * scale:6.2f} s{note}")
    return out


def row_presets(stage2: dict, fixed_s: float, final_mesh_s: float = 1.5) -> None:
    from backend.presets import CPU_SECONDS, TEXT_TO_SHAPE

    for preset, per_it in stage2.items():
        its = TEXT_TO_SHAPE[preset]["iterations"]
        est = fixed_s + its * per_it + final_mesh_s
        print(f"  text-to-shape {preset:8s}: ~{est:6.0f} s expected on this CPU ({fixed_s:.1f} s imports+loading+"
              f"stage 1, {its} x {per_it:.2f} s, ~{final_mesh_s:.1f} s final mesh); presets.CPU_SECONDS says "
              f"{CPU_SECONDS['text-to-shape'][preset]}")
    for wf in ("stylize", "gallery"):
        vals = CPU_SECONDS.get(wf, {})
        print(f"  {wf:13s} (not measured in this run: `bench {wf}`) presets.CPU_SECONDS: "
              + ", ".join(f"{k} {v if v is not None else 'hours'}" + (" s" if v else "") for k, v in vals.items()))


# --------------------------------------------------------------------------------------------- the server rows


def row_ready(work: Path, threads: int | None) -> None:
    from shared import protocol as P

    from backend.selftest import BackendProcess, accepted_job, collect, is_terminal_for

    params = {"prompt": PROMPT, "iterations": 2, "preview_every": 1, "resolution": 64}
    results = {}
    for label, extra in (("baseline", ["--no-preload"]), ("new", [])):
        env_threads = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        if label == "baseline":
            env_threads["OMP_WAIT_POLICY"] = ""  # libgomp's default, as before issue 15
        old = {k: os.environ.get(k) for k in env_threads}
        os.environ.update(env_threads)
        try:
            bp = BackendProcess(work / f"serve-{label}", profile="starter", device="cpu", warm_up=True,
                                extra_args=extra)
            t0 = time.perf_counter()
            bp.start()
            t_ready = time.perf_counter()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        t_models = None
        if label == "new":  # wait for the preloading thread's "models ready" line
            end = time.monotonic() + 300
            while time.monotonic() < end and "models ready" not in bp.log_tail(200):
                time.sleep(0.05)
            t_models = time.perf_counter() - t_ready
        try:
            client = bp.client(name="bench-speed")
            firsts = []
            for _ in range(2):
                t = time.perf_counter()
                ref = client.submit("text-to-shape", dict(params))
                msgs = collect(client, lambda m: m.kind in (P.MESH, P.REJECTED, P.FAILED), 300)
                first = time.perf_counter() - t
                job = accepted_job(msgs, ref)
                collect(client, is_terminal_for(job), 300)
                firsts.append(first)
            client.shutdown()
            with contextlib.suppress(TimeoutError):  # best effort: the backend is terminated below either way
                collect(client, lambda m: m.kind == "disconnected", 30)
            client.close()
        finally:
            bp.terminate()
        results[label] = (t_ready - t0, firsts[0], firsts[1], t_models)
        if t_models is None:
            print(f"  {label:8s} serve -> listening {t_ready - t0:5.1f} s | a job submitted at once: first preview "
                  f"after {firsts[0]:5.2f} s (imports and model loading inside the job) | warm backend: Generate -> "
                  f"first preview {firsts[1]:5.2f} s")
        else:
            print(f"  {label:8s} serve -> listening {t_ready - t0:5.1f} s -> 'models ready' {t_models:5.2f} s later | "
                  f"a job submitted then: first preview after {firsts[0]:5.2f} s | warm backend: Generate -> first "
                  f"preview {firsts[1]:5.2f} s")
    b, n = results["baseline"], results["new"]
    print(f"  ratio    first job's first preview, submitted when the backend says ready: {_ratio(b[1], n[1])} "
          f"(goal: ready for the first job <= 3 s after ready); warm first preview {_ratio(b[2], n[2])} (goal <= 2 s)")
    print(f"  listening -> first preview, cold: baseline {b[1]:.1f} s, new {n[3] + n[1]:.1f} s (imports and "
          f"loading now overlap the time the artist needs to connect and type a prompt)")


# --------------------------------------------------------------------------------------------- CUDA rows


def rows_cuda(iterations: int) -> None:
    import torch

    if not torch.cuda.is_available():
        print(f"  stage 2 at the paper's settings (full size): {NO_CUDA}")
        print(f"  stylize, texture mode, 100k faces, ViT-B-32, 40 iterations: {NO_CUDA}")
        print(f"  theme gallery, default preset: {NO_CUDA}")
        return
    from backend.bench.text_to_shape import full_size_models
    from backend.pipelines.iss_stages import Stage2Config

    try:
        clip, mapper, svr = full_size_models("cuda")
        cfg = Stage2Config()
        base = _stage2_seconds(clip, mapper, svr.decoder, cfg, "cuda", iterations)
        from backend.models.device import autocast, enable_tf32
        from backend.pipelines.text_to_shape import stage2_config

        enable_tf32("cuda")
        # the jobs' default CUDA path (issue 15): 32 k-ray checkpointed chunks (stage2_config on a GPU), TF32 and
        # bf16 autocast (JobContext.autocast with precision "auto")
        fast_cfg = stage2_config({}, "cuda")
        fast = _stage2_seconds(clip, mapper, svr.decoder, fast_cfg, "cuda", iterations,
                               autocast=lambda: autocast("cuda", "auto"))
        print(f"  stage 2, paper settings (ViT-B-32, decoder 512x5, 10 views at 90^2, 48 samples), per iteration: "
              f"baseline fp32 8k-ray chunks {base:.3f} s | the jobs' CUDA default (TF32 + bf16 autocast, "
              f"{fast_cfg.view.chunk // 1024}k-ray chunks) {fast:.3f} s | {_ratio(base, fast)} (goal <= 0.25 s); "
              f"20 iterations {20 * fast:.1f} s")
        print(f"  peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del clip, mapper, svr
    except Exception as exc:  # one failed row must not hide the others
        print(f"  stage 2, paper settings: failed: {type(exc).__name__}: {exc}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
    torch.cuda.empty_cache()
    from backend.bench import stylize

    print("  stylize (the stylize benchmark's GPU part):")
    try:
        stylize.main(["--skip-cpu", "--profile"])
    except Exception as exc:
        print(f"  stylize: failed: {type(exc).__name__}: {exc}")
    print("  theme gallery, default preset: not measured: the full-size gallery models cannot be fetched here")


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend bench speed", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads in this process and the subprocesses (0: torch's default)")
    ap.add_argument("--iterations", type=int, default=3, help="timed stage-2 iterations per setting")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        print(f"unknown rows {unknown}; known: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"speed benchmark (issue 15): torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    work = Path(tempfile.mkdtemp(prefix="stepstone-speed-"))
    fixed = None
    stage2 = None
    mesh_s = 1.5
    stage2_done = 20
    if "main-job" in rows:
        print("[CPU] README main job, starter profile, command to GLB:")
        r = row_main_job(args.threads or None, work)
        fixed = r["new"]["wall"]
        import re

        m = re.search(r"stopped after (\d+) iterations", r["new"]["out"])
        stage2_done = int(m.group(1)) if m else 20
    if "final-mesh" in rows:
        print("[CPU] final mesh at 128^3 (marching cubes of the decoder):")
        mesh_s = row_final_mesh()
    if "stage2" in rows or "presets" in rows:
        print("[CPU] stage-2 iterations, starter models, per preset:")
        stage2 = row_stage2(args.iterations)
    if "stage2" in rows:
        row_stage2_compare()
    if "presets" in rows:
        print("[CPU] expected time per preset:")
        if fixed is not None and stage2 is not None:
            # the main job is the standard preset: its fixed part is what remains after its stage-2 iterations
            # (the volume guard may have stopped it early) and its final mesh
            fixed = max(0.0, fixed - stage2_done * stage2["standard"] - mesh_s)
            print(f"  (the main job ran {stage2_done} full stage-2 iterations)")
        row_presets(stage2, fixed if fixed is not None else 8.0, mesh_s)
    if "ready" in rows:
        print("[CPU] backend start -> ready -> first preview (real serve process, ZeroMQ):")
        row_ready(work, args.threads or None)
    if "cuda" in rows:
        print("[CUDA] rows:")
        rows_cuda(args.iterations)
    print(f"(work files in {work})")
    return 0
