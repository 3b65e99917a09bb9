"""Stage 2, C-SFT: contrastive fine-tuning on behaviour pairs, its losses and retrieval evaluation."""
