"""The DGSS training command: ``python -m rein.train`` or ``rein-train`` (see loop.py)."""
from .loop import main

__all__ = ["main"]
