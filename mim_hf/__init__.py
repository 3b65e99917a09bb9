"""mim-hf: Multi-modal Content Interest Modeling (MIM) for CTR prediction, Hugging Face native.

``import mim_hf`` registers the package's configs and models with transformers'
``AutoConfig`` / ``AutoModel`` / ``AutoProcessor`` so ``AutoModel.from_pretrained(saved_dir)`` returns them.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .modeling.configuration_ciubm import CiUBMConfig
from .modeling.configuration_mim_encoder import MIMContentEncoderConfig
from .modeling.modeling_ciubm import CiUBMForCTR
from .modeling.modeling_mim_encoder import MIMContentEncoder
from .modeling.processing_mim_encoder import MIMContentProcessor

__version__ = "0.1.0"

for _config, _model in ((MIMContentEncoderConfig, MIMContentEncoder), (CiUBMConfig, CiUBMForCTR)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
AutoProcessor.register(MIMContentEncoderConfig, MIMContentProcessor, exist_ok=True)

__all__ = ["CiUBMConfig", "CiUBMForCTR", "MIMContentEncoder", "MIMContentEncoderConfig", "MIMContentProcessor"]
