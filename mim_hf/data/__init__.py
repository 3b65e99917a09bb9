"""The data layer: tables, MovieLens-100k, the synthetic multimodal world, protocols and samples."""

from .labels import LABEL_SCHEMES
from .movielens import load_movielens_100k
from .prepare import BUCKETS, PROTOCOLS, SPLITS, PrepareConfig, PreparedData, prepare
from .sources import load_tables
from .synthetic import SyntheticWorld, make_synthetic_world, render_item_image
from .tables import RecData, ValidationReport, validate_interactions, validate_items, validate_users
from .vocab import Vocabulary

__all__ = [
    "BUCKETS", "LABEL_SCHEMES", "PROTOCOLS", "SPLITS", "PrepareConfig", "PreparedData", "RecData", "ValidationReport",
    "SyntheticWorld", "Vocabulary", "load_movielens_100k", "load_tables", "make_synthetic_world", "render_item_image", "prepare", "validate_interactions", "validate_items",
    "validate_users",
]
