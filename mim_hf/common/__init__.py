"""Shared plumbing below the stages: file-system helpers, the training loop skeleton and checkpoints,
generic Hub plumbing and model/dataset cards."""
