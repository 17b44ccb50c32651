"""Model building: configs, the VLM class, fusion and projector modules, ternary layers, training stages.

Importing this package registers the VLM with transformers' Auto classes, so a saved VLM loads with
`AutoModelForImageTextToText.from_pretrained(path)` (plain safetensors + config.json, no remote code), and a reward
model (`VLMForRewardModeling`) with `AutoModelForSequenceClassification.from_pretrained(path)`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
)

from .configuration_vlm import FUSIONS, VLMConfig
from .modeling_vlm import (
    VLMForConditionalGeneration,
    VLMModel,
    pack_image_features,
    pack_pixel_values,
    unpack_image_features,
    unpack_pixel_values,
)
from .projectors import PROJECTORS
from .reward_model import ImageTextForRewardModeling, VLMForRewardModeling
from .stages import STAGES, freeze_for_stage
from .ternary import BitLinear, ternarize_

AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModel.register(VLMConfig, VLMModel, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)
AutoModelForSequenceClassification.register(VLMConfig, VLMForRewardModeling, exist_ok=True)

__all__ = [
    "FUSIONS",
    "ImageTextForRewardModeling",
    "PROJECTORS",
    "STAGES",
    "BitLinear",
    "VLMConfig",
    "VLMForConditionalGeneration",
    "VLMForRewardModeling",
    "VLMModel",
    "freeze_for_stage",
    "pack_image_features",
    "pack_pixel_values",
    "ternarize_",
    "unpack_image_features",
    "unpack_pixel_values",
]

from transformers import AutoProcessor  # noqa: E402

from .build import build_vlm  # noqa: E402
from .processing_vlm import VLMProcessor  # noqa: E402

AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)
__all__ += ["VLMProcessor", "build_vlm"]
