"""Shipped stage configs (YAML), installed as ``mim_hf.configs`` so ``mim-hf quickstart`` reads
the same files as ``accelerate launch training/<stage>.py --config training/configs/<file>``."""
