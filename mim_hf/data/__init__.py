"""The data layer: tables, MovieLens-100k, the synthetic multimodal world, protocols and samples."""

from .movielens import load_movielens_100k
from .prepare import BUCKETS, PROTOCOLS, SPLITS, PrepareConfig, PreparedData, prepare
from .tables import RecData, ValidationReport, validate_interactions, validate_items
from .vocab import Vocabulary

__all__ = [
    "BUCKETS", "PROTOCOLS", "SPLITS", "PrepareConfig", "PreparedData", "RecData", "ValidationReport",
    "Vocabulary", "load_movielens_100k", "prepare", "validate_interactions", "validate_items",
]
