"""The procedural starter world: deterministic per seed, captions, held-out split never in training."""

from __future__ import annotations

import numpy as np
import pytest

from backend.errors import InputError
from backend.training.captions import caption, parse_caption, random_caption
from backend.training.split import (
    HELDOUT_COLOUR_PAIRS,
    heldout_benchmark_set,
    heldout_descriptions,
    is_heldout,
    sample_shape,
)
from backend.training.world import ATTRIBUTES, CATEGORIES, COLOURS, build_shape


def _grid(n=24):
    u = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    return np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)


def test_world_has_enough_categories_and_attributes():
    assert len(CATEGORIES) >= 12
    assert len(COLOURS) >= 8
    assert all(len(space) >= 1 for space in ATTRIBUTES.values())


def test_world_is_deterministic_per_seed():
    g = _grid()
    for seed in (0, 1, 17):
        a, b = sample_shape(seed), sample_shape(seed)
        assert a.key() == b.key()
        np.testing.assert_array_equal(a.sdf.sdf(g), b.sdf.sdf(g))
        np.testing.assert_array_equal(a.sdf.color(g), b.sdf.color(g))
    keys = {sample_shape(s).key() for s in range(40)}
    assert len(keys) > 20  # different seeds give different shapes


def test_every_category_gives_a_bounded_nonempty_coloured_shape():
    g = _grid(32)
    for cat in CATEGORIES:
        attrs = {k: v[-1] for k, v in ATTRIBUTES[cat].items()}
        shape = build_shape(cat, "red", attrs, seed=3)
        d = shape.sdf.sdf(g)
        inside = d < 0
        assert inside.sum() > 20, cat
        # nothing touches the cube's boundary
        border = (np.abs(g) > 0.47).any(-1)
        assert not inside[border].any(), cat
        colours = shape.sdf.color(g[inside])
        assert colours.shape == (inside.sum(), 3) and (colours >= 0).all() and (colours <= 1).all()


def test_numpy_and_torch_sdfs_agree():
    torch = pytest.importorskip("torch")
    g = _grid(16)
    for cat in CATEGORIES:
        shape = build_shape(cat, "blue", {k: v[0] for k, v in ATTRIBUTES[cat].items()}, seed=1)
        d_np = shape.sdf.sdf(g)
        d_t = shape.sdf.sdf(torch.from_numpy(g)).numpy()
        np.testing.assert_allclose(d_np, d_t, atol=1e-5)
        np.testing.assert_allclose(shape.sdf.color(g), shape.sdf.color(torch.from_numpy(g)).numpy(), atol=1e-6)


def test_attributes_change_the_geometry():
    g = _grid(32)
    tall = build_shape("chair", "red", {"height": "tall", "armrests": False}, seed=5).sdf.sdf(g) < 0
    short = build_shape("chair", "red", {"height": "short", "armrests": False}, seed=5).sdf.sdf(g) < 0
    assert g[tall][:, 2].max() > g[short][:, 2].max() + 0.1


def test_captions_name_the_attributes_and_parse_back():
    shape = build_shape("chair", "red", {"height": "tall", "armrests": True})
    assert caption(shape) == "a tall red chair with armrests"
    t = build_shape("table", "orange", {"height": "short", "shape": "round", "legs": 3})
    assert caption(t) == "a short round orange table with three legs"
    assert parse_caption(caption(t)) == ("table", "orange", {"height": "short", "shape": "round", "legs": 3})
    assert parse_caption("an orange airplane")[0:2] == ("airplane", "orange")
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = random_caption(shape, rng)
        assert "chair" in c


def test_heldout_split_never_leaks_into_training():
    held = heldout_descriptions()
    assert len(held) > 20
    assert all(is_heldout(*d) for d in held)
    train_keys = set()
    for seed in range(3000):
        s = sample_shape(seed, "train")
        assert not is_heldout(s.category, s.colour, s.attrs), caption(s)
        assert (s.category, s.colour) not in HELDOUT_COLOUR_PAIRS
        train_keys.add(s.key())
    # but every category and colour still occurs in training
    assert {k[0] for k in train_keys} == set(CATEGORIES)
    assert {k[1] for k in train_keys} == set(COLOURS)
    for s in heldout_benchmark_set(26):
        assert is_heldout(s.category, s.colour, s.attrs)
        assert s.key() not in train_keys
    for seed in range(50):
        s = sample_shape(seed, "heldout")
        assert is_heldout(s.category, s.colour, s.attrs)


def test_bad_descriptions_are_input_errors():
    with pytest.raises(InputError, match="unknown category"):
        build_shape("spaceship", "red", {})
    with pytest.raises(InputError, match="unknown colour"):
        build_shape("chair", "teal", {"height": "tall", "armrests": True})
    with pytest.raises(InputError, match="must be one of"):
        build_shape("chair", "red", {"height": "giant", "armrests": True})
