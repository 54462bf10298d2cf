"""Whole messages in the panel (issue 16): wrapping to the sidebar's width instead of fixed character cuts, names
that fit Blender's 63-byte ID names without splitting a UTF-8 character, and a check for prompts the active
profile cannot read. Plain Python (no ``bpy``), so it is tested without Blender."""

from __future__ import annotations

import unicodedata

MAX_ID_BYTES = 63  # Blender ID names: 64 bytes with the terminating NUL
ELLIPSIS = "\u2026"


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces (a word longer than a line is broken
    inside); nothing is dropped: ``" ".join(wrap(t, w)).split() == t.split()`` for text without long words."""
    width = max(8, int(width))
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        cur = ""
        for word in para.split():
            while len(word) > width:  # a path or a hash longer than the panel
                if cur:
                    lines.append(cur)
                    cur = ""
                lines.append(word[:width])
                word = word[width:]
            if not cur:
                cur = word
            elif len(cur) + 1 + len(word) <= width:
                cur = f"{cur} {word}"
            else:
                lines.append(cur)
                cur = word
        if cur:
            lines.append(cur)
    return lines


def chars_per_line(region_width_px: float, ui_scale: float = 1.0, indent_px: float = 30.0) -> int:
    """About how many characters of the UI font fit a label in a region ``region_width_px`` wide (Blender's
    default UI font averages ~6.5 px per character at scale 1)."""
    scale = max(0.5, float(ui_scale or 1.0))
    return max(12, int((float(region_width_px) - indent_px * scale) / (6.5 * scale)))


def fit_bytes(text: str, max_bytes: int = MAX_ID_BYTES) -> str:
    """``text`` shortened to at most ``max_bytes`` UTF-8 bytes at a character boundary (with an ellipsis when
    shortened), so Blender never cuts a character in half ("...downloaded \\ufffd")."""
    text = str(text)
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    room = max_bytes - len(ELLIPSIS.encode("utf-8"))
    out = []
    used = 0
    for ch in text:
        n = len(ch.encode("utf-8"))
        if used + n > room:
            break
        out.append(ch)
        used += n
    return "".join(out).rstrip() + ELLIPSIS


def unreadable_share(prompt: str) -> float:
    """The share of a prompt's letters outside the Latin script (the starter and tiny profiles read English)."""
    letters = [c for c in prompt if c.isalpha()]
    if not letters:
        return 0.0
    other = sum(1 for c in letters if not unicodedata.name(c, "").startswith("LATIN"))
    return other / len(letters)


def prompt_warning(prompt: str, profile: str) -> str:
    """A sentence for a prompt the active profile is unlikely to read, else ``""``."""
    if profile not in ("starter", "tiny"):
        return ""
    if unreadable_share(prompt) > 0.3:
        return (f"The {profile} profile's text model reads English; most of this prompt's words are in another "
                "script, so the result may not match it. Write the prompt in English (e.g. 'a red chair').")
    return ""
