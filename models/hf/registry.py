"""The supported Hugging Face families, by `model_type`, and the default family for a ModelConfig."""

from __future__ import annotations

from models.config import ConfigError, ModelConfig
from models.hf.deepseek import DeepseekV2, DeepseekV3
from models.hf.family import Family
from models.hf.gemma import Gemma, Gemma2, Gemma3Text
from models.hf.gpt_oss import GptOss
from models.hf.llama import Llama
from models.hf.mistral import Mistral
from models.hf.mixtral import Mixtral
from models.hf.qwen2 import Qwen2
from models.hf.qwen3 import Qwen3
from models.hf.qwen3_moe import Qwen3Moe
from models.hf.starcoder2 import Starcoder2

# Order matters for `infer_family`: the first family that can express a config is chosen.
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (Llama(), Qwen2(), Qwen3(), Mistral(), Starcoder2(), Mixtral(), Qwen3Moe(), DeepseekV3(), DeepseekV2(), Gemma(),
              Gemma2(), Gemma3Text(), GptOss())
}


def get_family(model_type: str, source: str = "family") -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def infer_family(cfg: ModelConfig) -> Family:
    """The first family (in `FAMILIES` order) that can express `cfg`."""
    reasons = []
    for family in FAMILIES.values():
        try:
            family.hf_config(cfg)
            return family
        except ConfigError as error:
            reasons.append(f"{family.model_type}: {error}")
    raise ConfigError("no Hugging Face family can express this config:\n  " + "\n  ".join(reasons))
