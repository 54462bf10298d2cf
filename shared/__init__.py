"""Stepstone wire protocol and mesh codec: the only code both the Blender add-on and the backend import.

Pure stdlib + numpy (``shared.client`` additionally needs pyzmq, which the add-on bundles as a wheel).
"""
