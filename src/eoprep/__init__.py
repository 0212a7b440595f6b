"""eoprep: Earth-observation archives to training-ready chips."""

from __future__ import annotations

__version__ = "0.1.0"
