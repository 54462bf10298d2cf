"""Stages of the theme gallery (ThemeStation, paper 003): exemplar renders, theme fine-tuning, scores.

The workflow module :mod:`backend.pipelines.theme_gallery` orchestrates these; each module here has one job.
"""
