"""PreTrainedModel/config files, one model per file, transformers style.

These files import only torch and transformers so they can be uploaded as Hub remote
code; installed, this folder is the sub-package ``mim_hf.modeling``.
"""

from .configuration_mim_encoder import MIMContentEncoderConfig
from .modeling_mim_encoder import MIMContentEncoder
from .configuration_ciubm import CiUBMConfig
from .modeling_ciubm import CiUBMForCTR, CiUBMOutput
