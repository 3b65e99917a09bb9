"""The Representation Center: item id -> content embedding, precomputed, versioned, memory-mapped."""

from .store import RepresentationCenter, build_center

__all__ = ["RepresentationCenter", "build_center"]
