"""Qwen3: Llama with RMS-normalised queries and keys per head (QK-norm) and Qwen's sliding-window fields."""

from typing import Any

from models.config import ConfigError, ModelConfig
from models.hf.family import Family, HFConfig, qwen_sliding_window, qwen_sliding_window_config


class Qwen3(Family):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    defaults = {
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "rope_theta": 10000.0,
    }
    fixed = {**{k: v for k, v in Family.fixed.items() if k not in Family.SCHEDULE_FIELDS}, "qk_norm": True, "mlp_bias": False}

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias"))
        return dict(qk_norm=True, qkv_bias=bias, out_bias=bias, **qwen_sliding_window(hf))

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.qkv_bias != cfg.out_bias:
            raise ConfigError(f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}: {self.model_type} has one attention_bias")
        return {"attention_bias": cfg.qkv_bias, **qwen_sliding_window_config(cfg)}
