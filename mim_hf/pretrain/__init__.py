"""Stage 1, pre-training: domain adaptation and modal alignment of the content encoder."""
