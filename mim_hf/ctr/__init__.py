"""Stage 3, CiUBM: the CTR collator, training, prediction and metrics."""
