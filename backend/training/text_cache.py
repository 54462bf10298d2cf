"""Embeddings of captions by a locked text tower, cached on disk by caption string.

Trainers that condition on the starter's locked text tower (the starter CLIP's LiT training, the starter
text-to-image model) embed the same few thousand world captions again and again. A :class:`TextCache` file keeps
each distinct caption's embedding once, so a second run needs no text tower at all: this is what lets a GPU machine
that cannot hold the tower's weights (they come from a package on the registry) train the image side from a cache
made here.

File format (``.npz``): ``tower`` (the tower's name, a 0-d string), ``kind`` (what was embedded, e.g.
``"pooled"``), ``captions`` (U,) strings, ``emb`` (U, D) float32. A cache made by another tower or of another kind
is refused rather than silently mixed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from shared.atomic import write_atomic

log = logging.getLogger(__name__)


class TextCacheMiss(RuntimeError):
    """Captions are missing from the cache and no text encoder is available to embed them."""


class TextCache:
    """``caption -> embedding`` for one text tower, backed by an ``.npz`` file (optional)."""

    def __init__(self, tower: str, kind: str = "pooled", path: str | Path | None = None) -> None:
        self.tower = tower
        self.kind = kind
        self.path = Path(path) if path else None
        self._emb: dict[str, np.ndarray] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            self._read(self.path)

    def _read(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            tower, kind = str(z["tower"]), str(z["kind"])
            if tower != self.tower or kind != self.kind:
                raise ValueError(f"the text cache {path} holds {kind} embeddings of {tower!r}, "
                                 f"not {self.kind} embeddings of {self.tower!r}; delete it or name another file")
            caps, emb = z["captions"], z["emb"]
        self._emb = {str(c): emb[i].astype(np.float32) for i, c in enumerate(caps)}

    def __len__(self) -> int:
        return len(self._emb)

    def __contains__(self, caption: str) -> bool:
        return caption in self._emb

    def missing(self, captions: Iterable[str]) -> list[str]:
        return [c for c in dict.fromkeys(captions) if c not in self._emb]

    def embed(self, captions: list[str], encode: Optional[Callable[[list[str]], np.ndarray]] = None,
              batch: int = 256) -> np.ndarray:
        """Embeddings (len(captions), D) float32; captions not cached go through ``encode`` (batched) first."""
        todo = self.missing(captions)
        if todo:
            if encode is None:
                raise TextCacheMiss(f"{len(todo)} captions (e.g. {todo[0]!r}) are not in the text cache "
                                    f"{self.path or '(in memory)'} and the text tower {self.tower!r} is not loaded")
            for s in range(0, len(todo), batch):
                chunk = todo[s:s + batch]
                out = np.asarray(encode(chunk), dtype=np.float32)
                if out.shape[0] != len(chunk):
                    raise ValueError(f"the text encoder returned {out.shape[0]} rows for {len(chunk)} captions")
                for c, e in zip(chunk, out):
                    self._emb[c] = e
            self._dirty = True
            log.info("text cache: embedded %d new captions (%d cached)", len(todo), len(self._emb))
        return np.stack([self._emb[c] for c in captions]) if captions else np.zeros((0, 0), np.float32)

    def save(self, path: str | Path | None = None) -> Optional[Path]:
        """Write the cache (atomically) to ``path`` or the file it was opened with; no-op without either."""
        target = Path(path) if path else self.path
        if target is None or (not self._dirty and target == self.path and target.exists()):
            return target
        caps = list(self._emb)
        arrays = dict(tower=np.asarray(self.tower), kind=np.asarray(self.kind), captions=np.asarray(caps),
                 emb=np.stack([self._emb[c] for c in caps]) if caps else np.zeros((0, 0), np.float32))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda fh: np.savez(fh, **arrays), suffix=".npz")
        self._dirty = False
        return target
