"""The declared held-out split of the starter world (issue 9).

Held-out descriptions are category/colour pairs and category/attribute combinations that never occur in training
data (renders, captions, voxels); the quality benchmark generates shapes from their captions only, so it measures
compositional generalisation, not memory. Every colour and every category still occurs in training.
"""

from __future__ import annotations

import numpy as np

from backend.training.world import (
    CATEGORIES,
    ShapeSpec,
    all_descriptions,
    build_shape,
    sample_description,
)

# one unseen colour per category (each colour is held out for at most two categories)
HELDOUT_COLOUR_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("chair", "blue"),
        ("table", "red"),
        ("stool", "green"),
        ("bench", "yellow"),
        ("lamp", "purple"),
        ("shelf", "orange"),
        ("mug", "pink"),
        ("vase", "black"),
        ("bottle", "brown"),
        ("car", "orange"),
        ("airplane", "red"),
        ("tree", "yellow"),
        ("house", "blue"),
    }
)

# attribute combinations never seen in training for that category (any colour)
HELDOUT_ATTRIBUTE_COMBOS: tuple[tuple[str, dict], ...] = (
    ("chair", {"height": "short", "armrests": True}),
    ("table", {"shape": "round", "legs": 3}),
    ("house", {"height": "tall", "chimney": True}),
)

SPLITS = ("train", "heldout")


def is_heldout(category: str, colour: str, attrs: dict) -> bool:
    """True when this description belongs to the held-out split."""
    if (category, colour) in HELDOUT_COLOUR_PAIRS:
        return True
    for cat, combo in HELDOUT_ATTRIBUTE_COMBOS:
        if cat == category and all(attrs.get(k) == v for k, v in combo.items()):
            return True
    return False


def heldout_descriptions() -> list[tuple[str, str, dict]]:
    """All held-out (category, colour, attributes) combinations, in a fixed order."""
    return [d for d in all_descriptions() if is_heldout(*d)]


def sample_shape(seed: int, split: str = "train") -> ShapeSpec:
    """The shape number ``seed`` of ``split``: deterministic, and always inside that split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), 104729])
    if split == "heldout":
        descs = heldout_descriptions()
        cat, colour, attrs = descs[int(rng.integers(len(descs)))]
    else:
        while True:
            cat, colour, attrs = sample_description(rng)
            if not is_heldout(cat, colour, attrs):
                break
    return build_shape(cat, colour, attrs, seed=int(seed))


def heldout_benchmark_set(n: int, seed: int = 0) -> list[ShapeSpec]:
    """``n`` held-out shapes spread over the categories (round-robin), for the quality benchmark."""
    descs = heldout_descriptions()
    rng = np.random.default_rng([seed, 31337])
    by_cat: dict[str, list] = {c: [d for d in descs if d[0] == c] for c in CATEGORIES}
    out: list[ShapeSpec] = []
    i = 0
    while len(out) < n:
        cat = CATEGORIES[i % len(CATEGORIES)]
        pool = by_cat[cat]
        c, colour, attrs = pool[int(rng.integers(len(pool)))]
        out.append(build_shape(c, colour, attrs, seed=1_000_000 + i))
        i += 1
    return out
