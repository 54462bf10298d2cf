"""Issue 15 (speed): the fast paths give the same shapes as the previous ones, and every workflow's tiny models
stay finite in bf16 on the CPU. Timing is in ``python -m backend bench speed``, never here."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from backend.events import JobContext, MeshInput, MeshUpdate, Progress
from backend.fields.sparse_grid import sparse_level_grid
from backend.geometry import extract_mesh
from backend.models.registry import load_profile
from backend.pipelines import get_workflow
from backend.pipelines.iss_stages import decoder_mesh, occupancy_logit_grid

ROOT = Path(__file__).resolve().parents[1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ------------------------------------------------------------------------------------------- coarse-to-fine grids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_decoder_mesh_equals_the_dense_one(seed):
    """Starter decoder, stage-1 latents of random CLIP-like features: same grid sides, same mesh, IoU 1."""
    profile = load_profile("starter")
    mapper, dec = profile.mapper(), profile.svr().decoder
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = mapper(torch.nn.functional.normalize(torch.randn(1, mapper_in(mapper), generator=g), dim=-1))
    dense = occupancy_logit_grid(dec, z, 96)
    stats: dict = {}
    sparse = sparse_level_grid(lambda p: dec(p[None], z)[0][0], 96, stats=stats).numpy()
    assert stats["evaluated"] < 0.5 * stats["dense"]  # it did skip most of the grid
    assert _iou(dense > 0, sparse > 0) >= 0.99  # only free blobs thinner than 3 voxels can be missed
    v1, f1, _ = extract_mesh(dense, level=0.0, inside="above")
    v2, f2, _ = extract_mesh(sparse, level=0.0, inside="above")
    assert v1.shape == v2.shape and np.array_equal(f1, f2)
    np.testing.assert_allclose(v1, v2, atol=1e-5)
    # and through decoder_mesh, with colours
    m_dense = decoder_mesh(dec, z, 96, sparse=False)
    m_sparse = decoder_mesh(dec, z, 96)
    np.testing.assert_allclose(m_dense[0], m_sparse[0], atol=1e-5)
    assert np.abs(m_dense[2].astype(int) - m_sparse[2].astype(int)).max() <= 1


def mapper_in(mapper) -> int:
    return next(p for p in mapper.parameters() if p.ndim == 2).shape[1]


def test_sparse_grid_follows_a_thin_leg_the_coarse_grid_misses():
    """A sphere with a leg thinner than the coarse spacing: the flood fill from the seat follows the leg down."""
    def field(p: torch.Tensor) -> torch.Tensor:
        sphere = 0.25 - torch.linalg.norm(p - torch.tensor([0.0, 0.0, 0.15]), dim=-1)
        # a square leg 0.012 wide (coarse spacing at R=128 is 1/42 = 0.024), from the sphere down to z = -0.45,
        # placed between coarse samples
        off = 0.5 / 42
        leg = torch.minimum(0.006 - (p[:, :2] - off).abs().amax(-1), torch.minimum(p[:, 2] + 0.45, 0.0 - p[:, 2]))
        return torch.maximum(sphere, leg)

    pts = torch.stack(torch.meshgrid(*[torch.linspace(-0.5, 0.5, 128)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dense = field(pts).reshape(128, 128, 128).numpy()
    sparse = sparse_level_grid(field, 128).numpy()
    assert (dense[..., :20] > 0).any()  # the leg reaches down there
    assert np.array_equal(dense > 0, sparse > 0)
    v1, f1, _ = extract_mesh(dense, level=0.0, inside="above", min_component_fraction=0.0)
    v2, f2, _ = extract_mesh(sparse, level=0.0, inside="above", min_component_fraction=0.0)
    np.testing.assert_allclose(v1, v2, atol=1e-6)


def test_sparse_grid_keeps_shapes_touching_the_box():
    """A box cut by the cube's +x face: marching cubes closes it there, so those samples are exact too."""
    field = lambda p: 0.3 - (p - torch.tensor([0.3, 0.0, 0.0])).abs().amax(-1)  # noqa: E731
    pts = torch.stack(torch.meshgrid(*[torch.linspace(-0.5, 0.5, 64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dense = field(pts).reshape(64, 64, 64).numpy()
    sparse = sparse_level_grid(field, 64).numpy()
    assert np.array_equal(dense > 0, sparse > 0)
    v, f, _ = extract_mesh(sparse, level=0.0, inside="above")
    v0, f0, _ = extract_mesh(dense, level=0.0, inside="above")
    np.testing.assert_allclose(v, v0, atol=1e-6)
    assert trimesh.Trimesh(v, f).is_watertight


# ------------------------------------------------------------------------------------------- lazy CLI imports


def test_run_imports_only_the_chosen_workflow():
    code = ("import sys; from backend.cli import build_parser; "
            "a = build_parser('diagnostic').parse_args(['run', 'diagnostic', '--steps', '2']); "
            "print(a.workflow, 'backend.pipelines.theme_gallery' in sys.modules, "
            "'backend.pipelines.text_to_shape' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["diagnostic", "False", "False"]


# ------------------------------------------------------------------------------------------- bf16 on the CPU


_TERM = re.compile(r"([a-z_]+)=(-?[0-9.]+(?:e-?\d+)?|nan|-?inf)", re.I)


def _check_finite(events, workflow: str) -> MeshUpdate:
    terms = [(m.group(1), float(m.group(2))) for e in events if isinstance(e, Progress)
             for m in _TERM.finditer(e.message or "")]
    bad = [(k, v) for k, v in terms if not math.isfinite(v)]
    assert not bad, f"{workflow}: non-finite terms in bf16: {bad[:5]}"
    finals = [e for e in events if isinstance(e, MeshUpdate) and e.final]
    assert finals, f"{workflow}: no final mesh"
    for f in finals:
        assert len(f.faces) > 0 and np.isfinite(f.vertices).all(), f"{workflow}: empty or non-finite mesh"
    return finals[0]


def _bf16(run):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return list(run())


@pytest.fixture(scope="module")
def tiny():
    return load_profile("tiny")


def test_text_to_shape_tiny_bf16(tiny):
    wf = get_workflow("text-to-shape")
    p = wf.validate({"prompt": "a chair", "views": 1, "render_resolution": 16, "n_samples": 8, "resolution": 16,
                     "preview_resolution": 12, "preview_every": 1, "iterations": 3, "lr": 0.01}, [])
    events = _bf16(lambda: wf.run(p, [], JobContext(profile=tiny, device="cpu", seed=0)))
    terms = [e.message for e in events if isinstance(e, Progress) and e.stage == "align"]
    assert terms and all("clip=" in t for t in terms[:1])
    _check_finite(events, "text-to-shape")


def test_job_precision_setting_runs_the_stages_in_bf16(tiny, monkeypatch):
    """``--precision bf16`` (JobContext.precision) puts the iterative stages under bf16 autocast; ``auto`` leaves a
    CPU job in float32 (and is bf16 on CUDA); a wrong name or fp16 on a CPU is a clear error."""
    from backend.errors import InputError
    from backend.models.device import autocast
    from backend.pipelines import iss_stages

    seen = []
    orig = iss_stages.Stage2Aligner.step

    def step(self):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return orig(self)

    monkeypatch.setattr(iss_stages.Stage2Aligner, "step", step)
    wf = get_workflow("text-to-shape")
    p = wf.validate({"prompt": "a chair", "views": 1, "render_resolution": 16, "n_samples": 8, "resolution": 16,
                     "preview_every": 5, "iterations": 2, "lr": 0.01}, [])
    _check_finite(list(wf.run(p, [], JobContext(profile=tiny, device="cpu", seed=0, precision="bf16"))), "t2s")
    assert seen == [True, True]
    seen.clear()
    list(wf.run(p, [], JobContext(profile=tiny, device="cpu", seed=0)))
    assert seen == [False, False]
    assert not torch.is_autocast_enabled("cpu")  # the job's autocast ends with its stage
    with pytest.raises(InputError, match="fp16 autocast needs a CUDA"):
        autocast("cpu", "fp16")
    with pytest.raises(InputError, match="unknown precision"):
        autocast("cuda", "fp8")


def test_stylize_tiny_bf16(tiny):
    wf = get_workflow("stylize")
    m = trimesh.creation.icosphere(3, radius=0.4)
    mi = MeshInput("ball", m.vertices.astype(np.float32), m.faces.astype(np.uint32), None, None)
    p = wf.validate({"style": "mahogany", "iterations": 3, "views": 2, "render_resolution": 32, "n_samples": 16,
                     "grid_resolution": 32, "preview_every": 3, "eval_views": 2}, [mi])
    _check_finite(_bf16(lambda: wf.run(p, [mi], JobContext(profile=tiny, device="cpu", seed=0))), "stylize")


def test_image_to_shape_tiny_bf16(tiny, tmp_path):
    import argparse

    from PIL import Image as PILImage

    a = np.full((40, 48, 3), 255, np.uint8)
    a[8:32, 8:40] = [200, 40, 40]
    PILImage.fromarray(a).save(tmp_path / "concept.png")
    wf = get_workflow("image-to-shape")
    parser = argparse.ArgumentParser()
    wf.add_arguments(parser)
    params, inputs = wf.params_from_args(parser.parse_args(["--image", str(tmp_path / "concept.png")]))
    params["config"].update({"steps": 2, "voxel_upsample": 2, "mesh_resolution": 16})
    p = wf.validate(params, inputs)
    _check_finite(_bf16(lambda: wf.run(p, inputs, JobContext(profile=tiny, device="cpu", seed=1))),
                  "image-to-shape")


def test_gallery_tiny_bf16(tiny):
    wf = get_workflow("gallery")
    box = trimesh.creation.box((0.6, 0.4, 1.0))
    cols = np.tile(np.array([[200, 60, 40, 255]], np.uint8), (len(box.vertices), 1))
    inputs = [MeshInput("House", box.vertices.astype(np.float32), box.faces.astype(np.uint32), cols, None)]
    p = wf.validate({"count": 2, "subjects": ["a well"], "preset": "smoke"}, inputs)
    _check_finite(_bf16(lambda: wf.run(p, inputs, JobContext(profile=tiny, device="cpu", seed=3))), "gallery")


# ------------------------------------------------------------------------------------------- frozen decoder


def test_frozen_decoder_path_matches_autograd():
    """Stage 2's grid decode with the memory-saving backward: same values and the same gradient for z."""
    from backend.fields.adapters import CachedDecoderField
    from backend.fields.frozen_decoder import applies
    from backend.render import orbit_cameras, render

    dec = load_profile("starter").svr().decoder
    torch.manual_seed(0)
    z0 = torch.randn(1, dec.latent_dim) * 0.5
    cams = orbit_cameras([0.0, 120.0], elevation=20.0, radius=1.6)
    out = {}
    for mode in ("autograd", "frozen"):
        dec.requires_grad_(mode == "autograd")  # trainable weights: the decoder's own forward and autograd
        z = z0.clone().requires_grad_(True)
        assert applies(dec, z) == (mode == "frozen")
        field = CachedDecoderField(dec, z, 16)
        r = render(field, cams, 16, 16, n_samples=12, normals=None, stratified=False)
        loss = (r["rgb"] * torch.linspace(0, 1, 3)).sum() + r["alpha"].square().sum()
        (gz,) = torch.autograd.grad(loss, z)
        out[mode] = (field.grid.detach(), float(loss.detach()), gz)
    dec.requires_grad_(False)
    torch.testing.assert_close(out["frozen"][0], out["autograd"][0], rtol=1e-5, atol=1e-6)
    assert out["frozen"][1] == pytest.approx(out["autograd"][1], rel=1e-5)
    torch.testing.assert_close(out["frozen"][2], out["autograd"][2], rtol=1e-4, atol=1e-6)
    assert out["frozen"][2].abs().sum() > 0
