"""Batch encoding of an item catalogue with a `MIMContentEncoder` (the Representation Center, retrieval).

The loop lives next to the model (``modeling_mim_encoder.encode_items``, behind ``encoder.encode``)
so an encoder loaded as Hub remote code, without this package, encodes the same way.
"""

from mim_hf.modeling.modeling_mim_encoder import ENCODER_LEVELS, encode_items

__all__ = ["encode_items", "ENCODER_LEVELS"]
