"""Qwen2 / Qwen2.5(-Coder): Llama with biases on q/k/v (none on o) and Qwen's sliding-window fields."""

from typing import Any

from models.config import ModelConfig
from models.hf.family import Family, HFConfig, qwen_sliding_window, qwen_sliding_window_config


class Qwen2(Family):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    defaults = {
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "num_key_value_heads": 32,
        "head_dim": None,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "rope_theta": 10000.0,
    }
    fixed = {**{k: v for k, v in Family.fixed.items() if k not in Family.SCHEDULE_FIELDS},
             "qkv_bias": True, "out_bias": False, "mlp_bias": False}

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        return dict(qkv_bias=True, out_bias=False, mlp_bias=False, **qwen_sliding_window(hf))

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        return qwen_sliding_window_config(cfg)
