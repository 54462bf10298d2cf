"""Starter profile training: the procedural shape world, its dataset, and trainers for the starter models."""
