#!/usr/bin/env python
"""Benchmark: streamed meshes into Blender with the Stepstone add-on's code vs. GLB + the glTF importer.

Run from the repository root (it needs the ``bpy`` module, so it lives outside ``backend/``)::

    .venv/bin/python tests/bench_blender_import.py            # 100k and 1M faces, plus the streaming tick test
    .venv/bin/python -m backend bench blender-import           # the same, started from the backend CLI

It installs the freshly built extension into a throw-away HOME and, in the same run, prints

1. milliseconds to turn a 100k- and a 1M-face payload (vertices, faces, vertex colours) into a Blender object with
   the add-on's code (numpy preparation + staged ``foreach_set`` build + object/material), against writing a GLB
   with trimesh and importing it with ``bpy.ops.import_scene.gltf``;
2. the longest single poll tick (and the 99th percentile) while a real backend streams 1M-face meshes (the
   ``diagnostic`` workflow with ``faces=1000000``) into the scene through the add-on's timer function. Goal: no
   tick over 50 ms.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADDON = "bl_ext.user_default.stepstone"


def torus(faces: int, seed: int = 0):
    """A closed parametric torus with about ``faces`` triangles and per-vertex colours (numpy only)."""
    import numpy as np

    nv = max(3, int(np.sqrt(faces / 4)))
    nu = max(3, faces // (2 * nv))
    u = np.linspace(0, 2 * np.pi, nu, endpoint=False)
    v = np.linspace(0, 2 * np.pi, nv, endpoint=False)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    r = 0.11 * (1 + 0.2 * np.sin(5 * uu) * np.sin(3 * vv))
    ring = 0.28 + r * np.cos(vv)
    verts = np.stack([ring * np.cos(uu), ring * np.sin(uu), r * np.sin(vv)], -1).reshape(-1, 3).astype(np.float32)
    i = np.arange(nu, dtype=np.uint32)[:, None]
    j = np.arange(nv, dtype=np.uint32)[None, :]
    a, b = i * nv + j, ((i + 1) % nu) * nv + j
    c, d = ((i + 1) % nu) * nv + (j + 1) % nv, i * nv + (j + 1) % nv
    tri = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    rng = np.random.default_rng(seed)
    cols = np.empty((len(verts), 4), np.uint8)
    cols[:, :3] = rng.integers(0, 256, (len(verts), 3), dtype=np.uint8)
    cols[:, 3] = 255
    return verts, tri.astype(np.uint32), cols


def setup_blender(home: Path):
    os.environ["HOME"] = str(home)
    for var, sub in (("BLENDER_USER_RESOURCES", "resources"), ("BLENDER_USER_CONFIG", "config"),
                     ("BLENDER_USER_SCRIPTS", "scripts"), ("BLENDER_USER_EXTENSIONS", "extensions")):
        os.environ[var] = str(home / sub)
    import bpy

    sys.path.insert(0, str(ROOT))
    import build_addon

    zpath = build_addon.build(platforms=["linux-x64"], out_dir=home / "dist", cache=ROOT / "build" / "wheels",
                              stage_dir=home / "stage")
    bpy.ops.extensions.package_install_files(filepath=str(zpath), repo="user_default", enable_on_install=True)
    return bpy, sys.modules[ADDON]


def clear_scene(bpy) -> None:
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob)
    for me in list(bpy.data.meshes):
        bpy.data.meshes.remove(me)
    for m in list(bpy.data.materials):
        bpy.data.materials.remove(m)


def bench_import(bpy, mod, faces: int, reps: int, tmp: Path) -> dict:
    import trimesh

    from importlib import import_module

    meshbuild = import_module(f"{ADDON}.meshbuild")
    meshprep = import_module(f"{ADDON}.meshprep")
    scene = import_module(f"{ADDON}.scene")
    v, f, c = torus(faces)
    out = {"faces": len(f), "vertices": len(v), "addon_ms": [], "addon_prep_ms": [], "addon_build_ms": [],
           "addon_longest_stage_ms": [], "glb_write_ms": [], "gltf_import_ms": [], "glb_total_ms": []}
    for _ in range(reps):
        clear_scene(bpy)
        t0 = time.perf_counter()
        p = meshprep.prepare_mesh("bench", v, f, c)
        t1 = time.perf_counter()
        build = meshbuild.MeshBuild(p, "bench")
        longest = 0.0
        while not build.done:
            ts = time.perf_counter()
            build.step()
            longest = max(longest, time.perf_counter() - ts)
        me = build.mesh
        scene.ensure_material(me)
        ob = bpy.data.objects.new("bench", me)
        bpy.context.scene.collection.objects.link(ob)
        t2 = time.perf_counter()
        assert len(ob.data.polygons) == len(f)
        out["addon_prep_ms"].append(1000 * (t1 - t0))
        out["addon_build_ms"].append(1000 * (t2 - t1))
        out["addon_ms"].append(1000 * (t2 - t0))
        out["addon_longest_stage_ms"].append(1000 * longest)

        clear_scene(bpy)
        path = tmp / f"bench_{faces}.glb"
        t0 = time.perf_counter()
        tm = trimesh.Trimesh(vertices=v, faces=f, vertex_colors=c, process=False)
        tm.export(path)
        t1 = time.perf_counter()
        bpy.ops.import_scene.gltf(filepath=str(path))
        t2 = time.perf_counter()
        imported = [o for o in bpy.data.objects if o.type == "MESH"]
        assert imported and len(imported[0].data.polygons) == len(f)
        out["glb_write_ms"].append(1000 * (t1 - t0))
        out["gltf_import_ms"].append(1000 * (t2 - t1))
        out["glb_total_ms"].append(1000 * (t2 - t0))
    clear_scene(bpy)
    return out


def bench_stream(bpy, mod, faces: int, steps: int, home: Path, delay: float = 1.0) -> dict:
    """A real backend streams ``steps`` meshes of ``faces`` faces; the add-on's timer function is driven here."""
    runtime = home / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    conn = runtime / "backend.json"
    env = dict(os.environ, STEPSTONE_RUNTIME_DIR=str(runtime), STEPSTONE_STORE_DIR=str(home / "store"))
    log = open(home / "backend.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--connection-file", str(conn),
                             "--profile", "tiny", "--device", "cpu", "--heartbeat", "0.5"],
                            cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not conn.is_file():
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError((home / "backend.log").read_text()[-2000:])
            time.sleep(0.1)
        s = mod.session.get()
        prefs = bpy.context.preferences.addons[ADDON].preferences
        prefs.connection_file = str(conn)
        prefs.timeout_s = 10.0
        s.connect(prefs)
        while not s.connected:
            s.tick()
            time.sleep(0.01)
        from importlib import import_module

        Placement = import_module(f"{ADDON}.jobs").Placement
        ticks: list[float] = []
        t_submit = time.perf_counter()
        job = s.submit("diagnostic", {"steps": steps, "faces": faces, "delay": delay}, None, "stream bench",
                       Placement(collection="bench"))
        first_mesh_s = None
        while job.active or s.stream.busy:
            ts = time.perf_counter()
            interval = s.tick()
            ticks.append(time.perf_counter() - ts)
            if first_mesh_s is None and job.slots:
                first_mesh_s = time.perf_counter() - t_submit
            time.sleep(min(interval, 0.02))  # what bpy.app.timers would do between ticks
            if time.perf_counter() - t_submit > 300:
                raise RuntimeError("streaming bench timed out")
        total = time.perf_counter() - t_submit
        ob = bpy.data.objects[job.slots["diagnostic"]]
        ticks_ms = sorted(1000 * t for t in ticks)
        return {"faces_per_mesh": len(ob.data.polygons), "meshes_received": job.meshes_received, "state": job.state,
                "ticks": len(ticks), "longest_tick_ms": ticks_ms[-1], "p99_tick_ms": ticks_ms[int(0.99 * (len(ticks_ms) - 1))],
                "median_tick_ms": ticks_ms[len(ticks_ms) // 2], "ticks_over_50ms": sum(t > 50 for t in ticks_ms),
                "first_mesh_in_scene_s": first_mesh_s, "final_in_scene_s": total,
                "longest_build_stage_ms": 1000 * s.stream.longest_stage_s,
                "stage_max_ms": {k: round(1000 * v, 1) for k, v in s.stream.stage_max_s.items()},
                "in_place_updates": s.stream.in_place_updates}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def fmt(xs: list[float]) -> str:
    return f"{min(xs):8.1f} (runs: {', '.join(f'{x:.0f}' for x in xs)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="face counts for the import comparison")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--stream-faces", type=int, default=1_000_000)
    ap.add_argument("--stream-steps", type=int, default=4)
    ap.add_argument("--stream-delay", type=float, default=1.0,
                    help="seconds between the backend's meshes (0: as fast as it can; most then coalesce)")
    ap.add_argument("--no-stream", action="store_true")
    args = ap.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="stepstone-bench-"))
    bpy, mod = setup_blender(home)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"Blender {bpy.app.version_string}; {os.cpu_count()} CPUs; load average {load[0]:.1f} "
          "(other processes on the machine slow every number below)")
    print("import of one payload into a Blender object (ms, best of runs):")
    for n in [int(x) for x in args.sizes.split(",") if x]:
        r = bench_import(bpy, mod, n, args.reps, home)
        print(f"  {r['faces']:>9,} faces / {r['vertices']:,} vertices")
        print(f"    add-on total        {fmt(r['addon_ms'])}")
        print(f"      prepare (thread)  {fmt(r['addon_prep_ms'])}")
        print(f"      build (main)      {fmt(r['addon_build_ms'])}   longest stage {min(r['addon_longest_stage_ms']):.1f}")
        print(f"    GLB write + import  {fmt(r['glb_total_ms'])}")
        print(f"      write GLB         {fmt(r['glb_write_ms'])}")
        print(f"      import_scene.gltf {fmt(r['gltf_import_ms'])}")
        print(f"    speed-up            {min(r['glb_total_ms']) / min(r['addon_ms']):.1f}x "
              f"(main thread only: {min(r['glb_total_ms']) / min(r['addon_build_ms']):.1f}x)")
    if not args.no_stream:
        r = bench_stream(bpy, mod, args.stream_faces, args.stream_steps, home, args.stream_delay)
        print(f"streaming {args.stream_steps} + 1 meshes of {r['faces_per_mesh']:,} faces from a real backend, "
              f"{args.stream_delay:g} s apart ({r['meshes_received']} received after coalescing; job {r['state']}):")
        print(f"  poll ticks {r['ticks']}: longest {r['longest_tick_ms']:.1f} ms, p99 {r['p99_tick_ms']:.1f} ms, "
              f"median {r['median_tick_ms']:.2f} ms, over 50 ms: {r['ticks_over_50ms']} (goal: 0)")
        print(f"  longest single build stage {r['longest_build_stage_ms']:.1f} ms; first mesh in the scene after "
              f"{r['first_mesh_in_scene_s']:.2f} s, final after {r['final_in_scene_s']:.2f} s")
        print(f"  longest time per build stage (ms): {r['stage_max_ms']}; updates done in place: "
              f"{r['in_place_updates']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
