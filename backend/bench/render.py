"""``python -m backend bench render``: speed of the 3D core measured in this run.

Prints rays x samples per second of the volume renderer on a 128^3 DVGO density grid with the colour MLP
(Dream3D appendix D) at 64x64 and 256x256, with and without autograd normals and for a forward+backward training
step; marching cubes time at 128^3 and 256^3; mesh -> SDF time at 64^3 and 128^3. The same on CUDA when a GPU is
present. Random weights are fine for timing; the density grid holds a sphere so rays do real work.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch


def _timeit(fn: Callable[[], object], sync: Callable[[], None], min_time: float, max_reps: int) -> float:
    fn()  # warm-up
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        sync()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or reps >= max_reps:
            return elapsed / reps


def bench_renderer(device: str, grid_res: int, sizes: list[int], n_samples: int, min_time: float) -> None:
    from backend.fields import DensityGridField, grid_points
    from backend.render import orbit_cameras, render

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sdf = torch.linalg.norm(grid_points(grid_res), dim=-1) - 0.3
    field = DensityGridField.from_sdf(sdf, color="mlp").to(device)
    print(f"renderer on {device}: {grid_res}^3 density grid + colour MLP, {n_samples} samples per ray")
    for size in sizes:
        cams = orbit_cameras([30.0], 20.0, device=device)
        rays = size * size
        chunk = 65536 if device == "cuda" else 8192
        for label, normals, train in (("forward", None, False), ("forward+normals", "autograd", False),
                                      ("train step", "autograd", True)):

            def step():
                if train:
                    out = render(field, cams, size, size, n_samples=n_samples, chunk=chunk, normals=normals)
                    (out["rgb"].mean() + out["normal"].square().mean()).backward()
                else:
                    with torch.no_grad():
                        render(field, cams, size, size, n_samples=n_samples, chunk=chunk, normals=normals)

            sec = _timeit(step, sync, min_time, 50)
            print(f"  {size}x{size} {label:16s} {sec * 1000:9.1f} ms/view  {rays * n_samples / sec / 1e6:8.2f} M ray-samples/s")


def bench_marching_cubes(resolutions: list[int], min_time: float) -> None:
    from backend.geometry import extract_mesh

    print("marching cubes (scikit-image, sphere SDF, with clean-up)")
    for res in resolutions:
        lin = np.linspace(-0.5, 0.5, res, dtype=np.float32)
        x, y, z = np.meshgrid(lin, lin, lin, indexing="ij")
        sdf = np.sqrt(x * x + y * y + z * z) - 0.35
        holder = {}
        sec = _timeit(lambda: holder.update(m=extract_mesh(sdf)), lambda: None, min_time, 5)
        print(f"  {res}^3: {sec * 1000:9.1f} ms  ({len(holder['m'][1]):,} faces)")


def bench_mesh_to_sdf(resolutions: list[int], min_time: float) -> None:
    import trimesh

    from backend.geometry import mesh_to_sdf

    mesh = trimesh.creation.torus(1.0, 0.35, major_sections=96, minor_sections=48)
    print(f"mesh -> SDF (torus, {len(mesh.faces):,} faces, flood-fill inside test)")
    for res in resolutions:
        sec = _timeit(lambda: mesh_to_sdf(mesh.vertices, mesh.faces, res), lambda: None, min_time, 3)
        print(f"  {res}^3: {sec * 1000:9.1f} ms")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m backend bench render", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller grids and images (smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds to time each case for")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.quick:
        bench_renderer("cpu", 32, [16, 32], 16, 0.05)
        bench_marching_cubes([32], 0.05)
        bench_mesh_to_sdf([24], 0.05)
        return 0
    bench_renderer("cpu", 128, [64, 256], 64, args.min_time)
    bench_marching_cubes([128, 256], args.min_time)
    bench_mesh_to_sdf([64, 128], args.min_time)
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name(0)}")
        bench_renderer("cuda", 128, [64, 256], 64, args.min_time)
    else:
        print("CUDA: not available on this machine (no GPU numbers)")
    return 0
