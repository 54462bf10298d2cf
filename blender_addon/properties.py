"""Sidebar inputs, stored per scene (``scene.stepstone``)."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

QUALITY = [
    ("fast", "Fast", "ISS++ stage 1/2: CLIP -> mapper -> shape latent, with test-time fine-tuning"),
    ("refined", "Refined", "Adds SDS refinement with a diffusion model (ISS++ Eq. 7); needs the diffusion model"),
]
STYLE_MODES = [
    ("texture", "Texture", "Change colours only (ISS++ Sec. 3.3, CLIP guidance)"),
    ("shape", "Shape and texture", "Change colours and geometry, kept near the source by the 3D prior loss"),
    ("sds", "SDS", "Score distillation with a diffusion model (ISS++ Eq. 7)"),
]


PRESETS = [
    ("auto", "Auto", "The preset the backend chooses for its device and memory (shown below)"),
    ("draft", "Draft", "Smallest settings: a quick look, seconds to a minute or two on a CPU"),
    ("standard", "Standard", "The paper's method scaled to a CPU: the default on a CPU"),
    ("paper", "Paper", "The paper's own settings: the default on a large GPU; hours on a CPU"),
]
IMAGE_SOURCES = [
    ("IMAGE", "Image", "An image datablock of this file (loaded, rendered or painted)"),
    ("FILE", "File", "An image file on disk"),
]


class STEPSTONE_PG_settings(bpy.types.PropertyGroup):
    # Generate from text
    prompt: StringProperty(name="Prompt", default="a wooden chair",
                           description="What to make, e.g. 'a red sports car'")
    variants: IntProperty(name="Variants", default=1, min=1, max=16,
                          description="How many different shapes (ISS++ Eq. 5 diversity); laid out on a grid")
    quality: EnumProperty(name="Quality", items=QUALITY, default="fast")
    t2s_preset: EnumProperty(name="Preset", items=PRESETS, default="auto",
                             description="Quality preset (views, resolution, iterations); Auto fits this backend")
    seed: IntProperty(name="Seed", default=0, min=0, description="Same seed and prompt give the same result")
    uv_texture: BoolProperty(
        name="UV texture", default=False,
        description="Pipeline-ready results: decimated to the preset's face budget, with a UV map and the colours "
                    "baked into an image texture (a material with the image as Base Color); the colour attribute "
                    "stays. Adds a few seconds per result",
    )
    # Stylize selected
    style: StringProperty(name="Style", default="made of rusty metal",
                          description="Text that describes the new look, e.g. 'a golden statue'")
    mode: EnumProperty(name="Mode", items=STYLE_MODES, default="texture")
    strength: FloatProperty(name="Strength", default=0.5, min=0.0, max=1.0, subtype="FACTOR",
                            description="How far the result may move from the source")
    stylize_preset: EnumProperty(name="Preset", items=PRESETS, default="auto",
                                 description="Quality preset (views, resolution, iterations); Auto fits this backend")
    replace_source: BoolProperty(
        name="Replace source mesh", default=False,
        description="Put the result into the selected object's mesh data instead of a new object "
                    "(the original mesh is kept in the file with a fake user)",
    )
    # Theme gallery
    subjects: StringProperty(name="Subjects", default="",
                             description="Optional, comma separated: what the new assets should be, e.g. 'tower, gate'")
    count: IntProperty(name="Count", default=3, min=1, max=32, description="How many new assets")
    spacing: FloatProperty(name="Grid spacing", default=1.5, min=0.1, max=100.0, unit="LENGTH",
                           description="Distance between results on the grid")
    gallery_preset: EnumProperty(name="Preset", items=PRESETS, default="auto",
                                 description="Quality preset of every stage; Auto fits this backend")
    # Image to shape
    image_source: EnumProperty(name="Source", items=IMAGE_SOURCES, default="IMAGE")
    image: PointerProperty(name="Image", type=bpy.types.Image,
                           description="The image to lift to 3D (an object on a plain background works best)")
    image_path: StringProperty(name="File", subtype="FILE_PATH", default="",
                               description="An image file (PNG, JPEG) to lift to 3D")
    show_finished: BoolProperty(name="Show finished jobs", default=True)


classes = (STEPSTONE_PG_settings,)


def register_props() -> None:
    bpy.types.Scene.stepstone = PointerProperty(type=STEPSTONE_PG_settings)


def unregister_props() -> None:
    if hasattr(bpy.types.Scene, "stepstone"):
        del bpy.types.Scene.stepstone
