"""mim-hf: Multi-modal Content Interest Modeling (MIM) for CTR prediction, Hugging Face native.

``import mim_hf`` registers the package's configs and models with transformers'
``AutoConfig`` / ``AutoModel`` so ``AutoModel.from_pretrained(saved_dir)`` returns them.
"""

__version__ = "0.1.0"

# ---- Auto-class registration (one block per model; keep blocks independent) ----
# [encoder-registration]
from transformers import AutoConfig as _AutoConfig, AutoModel as _AutoModel  # noqa: E402
from .modeling.configuration_mim_encoder import MIMContentEncoderConfig  # noqa: E402
from .modeling.modeling_mim_encoder import MIMContentEncoder  # noqa: E402
from .modeling.processing_mim_encoder import MIMContentProcessor  # noqa: E402

_AutoConfig.register(MIMContentEncoderConfig.model_type, MIMContentEncoderConfig, exist_ok=True)
_AutoModel.register(MIMContentEncoderConfig, MIMContentEncoder, exist_ok=True)
# [ctr-registration]
from transformers import AutoConfig as _AutoConfig, AutoModel as _AutoModel  # noqa: E402
from .modeling.configuration_ciubm import CiUBMConfig  # noqa: E402
from .modeling.modeling_ciubm import CiUBMForCTR  # noqa: E402
_AutoConfig.register(CiUBMConfig.model_type, CiUBMConfig, exist_ok=True)
_AutoModel.register(CiUBMConfig, CiUBMForCTR, exist_ok=True)
