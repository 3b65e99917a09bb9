"""mim-hf: Multi-modal Content Interest Modeling (MIM) for CTR prediction, Hugging Face native.

``import mim_hf`` registers the package's configs and models with transformers'
``AutoConfig`` / ``AutoModel`` so ``AutoModel.from_pretrained(saved_dir)`` returns them.
"""

__version__ = "0.1.0"

# ---- Auto-class registration (one block per model; keep blocks independent) ----
# [encoder-registration]
# [ctr-registration]
