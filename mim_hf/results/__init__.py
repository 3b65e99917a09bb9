"""`mim-hf results`: the tuned, multi-fold, multi-seed results table with FuxiCTR DIN as reference
(see docs/results-protocol.md)."""
