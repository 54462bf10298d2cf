"""Stepstone backend: generation and stylization stages (torch, open_clip, diffusers), never imports bpy."""

__version__ = "0.1.0"
