"""The Representation Center: item id -> content embedding, precomputed, versioned, memory-mapped."""

from .build import build_center
from .store import RepresentationCenter

__all__ = ["RepresentationCenter", "build_center"]
