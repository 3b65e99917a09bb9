"""Training stages (pre-training, C-SFT, CTR), each a config dataclass and a ``run`` function.

``training/*.py`` are the ``accelerate launch`` entry points; ``mim-hf quickstart`` calls the
same ``run`` functions in-process.
"""
