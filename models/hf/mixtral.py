"""Mixtral: Mistral attention with every block's MLP replaced by 8 SwiGLU experts, top-2 routing
renormalised over the chosen experts (`block_sparse_moe`, experts w1 = gate, w3 = up, w2 = down)."""

from typing import Any

from models.config import ConfigError, ModelConfig, MoEConfig
from models.hf.family import HFConfig, MoEFamily
from models.hf.mistral import Mistral


class Mixtral(MoEFamily, Mistral):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    defaults = {
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "num_key_value_heads": 8,
        "head_dim": None,
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rope_theta": 1e6,
    }
    moe_prefix = "block_sparse_moe"
    expert_projections = {"gate": "w1", "up": "w3", "down": "w2"}
    fixed_moe = {**MoEFamily.fixed_moe, "normalize_top_k": True, "first_dense_layers": 0, "sparse_step": 1}

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        experts = hf.values.get("num_local_experts", hf.values.get("num_experts", hf.defaults["num_local_experts"]))
        moe = MoEConfig(num_experts=experts, experts_per_token=hf.get("num_experts_per_tok"), normalize_top_k=True)
        return {**super().family_fields(hf), "moe": moe}

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        assert cfg.moe is not None
        if cfg.moe.expert_d_ff and cfg.moe.expert_d_ff != cfg.d_ff:
            raise ConfigError(f"moe.expert_d_ff={cfg.moe.expert_d_ff}: Mixtral's experts are d_ff={cfg.d_ff} wide")
        return {
            **super().family_config(cfg),
            "num_local_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.experts_per_token,
        }
