"""Captions for shapes of the procedural world: ``"a tall red chair with armrests"``.

:func:`caption` is the canonical caption (every attribute named, false flags left out); :func:`random_caption`
drops and rephrases parts at random so the starter CLIP learns each word on its own (training augmentation).
:func:`parse_caption` reads a prompt back into a (category, colour, attributes) description where it can.
"""

from __future__ import annotations

import re

import numpy as np

from backend.training.world import ATTRIBUTES, CATEGORIES, COLOURS, ShapeSpec

NUMBER_WORDS = {3: "three", 4: "four"}
FLAG_PHRASES = {"armrests": "armrests", "backrest": "a backrest", "chimney": "a chimney"}
ADJECTIVE_ORDER = ("height", "width", "shape")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _compose(category: str, colour: str | None, attrs: dict, include: set[str], negate_flags: bool = False) -> str:
    words = [str(attrs[k]) for k in ADJECTIVE_ORDER if k in attrs and k in include]
    if colour is not None:
        words.append(colour)
    words.append(category)
    text = " ".join(words)
    tail = []
    if "legs" in attrs and "legs" in include:
        tail.append(f"with {NUMBER_WORDS[attrs['legs']]} legs")
    for flag, phrase in FLAG_PHRASES.items():
        if flag in attrs and flag in include:
            if attrs[flag]:
                tail.append(f"with {phrase}")
            elif negate_flags:
                tail.append(f"without {phrase.removeprefix('a ')}")
    if tail:
        text += " " + " and ".join(tail)
    return f"{_article(text)} {text}"


def caption(shape: ShapeSpec) -> str:
    """The canonical caption: all attributes, the colour and the category (``False`` flags omitted)."""
    return _compose(shape.category, shape.colour, shape.attrs, set(shape.attrs))


def describe(category: str, colour: str, attrs: dict) -> str:
    """Canonical caption of a description without building the shape."""
    return _compose(category, colour, attrs, set(attrs))


def random_caption(shape: ShapeSpec, rng: np.random.Generator, keep: float = 0.7) -> str:
    """A caption naming a random subset of the attributes (each kept with probability ``keep``)."""
    include = {k for k in shape.attrs if rng.random() < keep}
    colour = shape.colour if rng.random() < 0.9 else None
    return _compose(shape.category, colour, shape.attrs, include, negate_flags=rng.random() < 0.3)


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> tuple[str | None, str | None, dict]:
    """Best-effort reading of a prompt into (category, colour, attributes); unknown words are ignored."""
    words = _WORD.findall(text.lower())
    category = next((w for w in words if w in CATEGORIES), None)
    if category is None:
        plural = {c + "s": c for c in CATEGORIES}
        category = next((plural[w] for w in words if w in plural), None)
    colour = next((w for w in words if w in COLOURS), None)
    attrs: dict = {}
    if category is not None:
        space = ATTRIBUTES[category]
        for name, values in space.items():
            for v in values:
                if isinstance(v, str) and v in words:
                    attrs[name] = v
        if "legs" in space:
            for n, w in NUMBER_WORDS.items():
                if w in words or str(n) in text:
                    attrs["legs"] = n
        for flag in FLAG_PHRASES:
            if flag in space and flag in words:
                attrs[flag] = not ("without" in words or "no" in words)
    return category, colour, attrs
