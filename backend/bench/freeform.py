"""Free-form prompts for ``bench quality`` (issue 12): words that never occur in a world caption.

Every prompt names one of the world's 13 categories only through a synonym, a hypernym-like everyday word or a
whole sentence ("armchair", "aeroplane", "coffee cup", "bookcase", "cottage" ...), and some name their colour by
a shade the palette does not use ("crimson", "navy", "emerald" ...). The list was written once by hand before any
model was trained on the new text tower and is not tuned on results. ``colour`` is None where the prompt names
no colour (only the category is scored then).
"""

from __future__ import annotations

# (prompt, category, colour or None)
FREEFORM_PROMPTS: tuple[tuple[str, str, str | None], ...] = (
    ("an armchair", "chair", None),
    ("a comfy armchair for a living room", "chair", None),
    ("a crimson dining seat with a high back", "chair", "red"),
    ("an office seat with arm rests", "chair", None),
    ("a dining table", "table", None),
    ("a navy coffee table", "table", "blue"),
    ("a desk to work at", "table", None),
    ("a round kitchen table standing on three feet", "table", None),
    ("a bar stool", "stool", None),
    ("a low footstool", "stool", None),
    ("an emerald seat without a back for a counter", "stool", "green"),
    ("a park bench", "bench", None),
    ("a long seat for several people in a garden", "bench", None),
    ("a scarlet garden bench with a back", "bench", "red"),
    ("a floor lamp", "lamp", None),
    ("a desk light", "lamp", None),
    ("a standing light with a spherical shade", "lamp", None),
    ("a golden reading light", "lamp", "yellow"),
    ("a bookcase", "shelf", None),
    ("a bookshelf", "shelf", None),
    ("a tall shelving unit for books", "shelf", None),
    ("a violet storage rack", "shelf", "purple"),
    ("a coffee cup", "mug", None),
    ("a tea cup with a handle", "mug", None),
    ("a cup of hot chocolate", "mug", None),
    ("a rose-coloured cup", "mug", "pink"),
    ("a flower vase", "vase", None),
    ("an urn", "vase", None),
    ("a ceramic pot to put flowers in", "vase", None),
    ("a wine bottle", "bottle", None),
    ("a water bottle", "bottle", None),
    ("a glass flask", "bottle", None),
    ("an ebony bottle of beer", "bottle", "black"),
    ("an automobile", "car", None),
    ("a sedan", "car", None),
    ("a sports car", "car", None),
    ("a navy vehicle with four wheels", "car", "blue"),
    ("an aeroplane", "airplane", None),
    ("a jet", "airplane", None),
    ("an aircraft", "airplane", None),
    ("a crimson passenger plane", "airplane", "red"),
    ("a pine", "tree", None),
    ("a fir", "tree", None),
    ("an oak", "tree", None),
    ("an emerald christmas tree", "tree", "green"),
    ("a cottage", "house", None),
    ("a cabin", "house", None),
    ("a home with a chimney", "house", None),
    ("a small building with a roof", "house", None),
    ("a tangerine hut", "house", "orange"),
)
