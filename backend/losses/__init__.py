"""Loss terms, one small module per paper term (DESIGN.md, "The backend, as layers").

Import the term you need from its module (``from backend.losses.sds import sds_loss``); nothing is re-exported here
so that importing one term stays cheap.
"""
