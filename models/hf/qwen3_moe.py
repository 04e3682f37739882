"""Qwen3-MoE: Qwen3 attention (QK-norm) with MoE blocks (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`);
`norm_topk_prob` renormalises the chosen experts' weights, `mlp_only_layers` keeps leading layers dense,
`decoder_sparse_step` makes every k-th layer MoE. Its sliding window, when `use_sliding_window`, applies
to every layer: transformers' Qwen3-MoE has neither `max_window_layers` nor `layer_types` (Hub configs
carry a `max_window_layers` that it ignores)."""

from typing import Any

from models.config import ConfigError, ModelConfig, MoEConfig
from models.hf.family import Family, HFConfig, MoEFamily
from models.hf.qwen3 import Qwen3


class Qwen3Moe(MoEFamily, Qwen3):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    defaults = {
        **Qwen3.defaults,
        "num_key_value_heads": 4,
        "head_dim": None,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": None,
    }
    fixed = {**Qwen3.fixed, **{k: Family.fixed[k] for k in Family.SCHEDULE_FIELDS}}
    moe_prefix = "mlp"
    expert_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        step = hf.get("decoder_sparse_step")
        if not (isinstance(step, int) and step >= 1):
            raise hf.error("decoder_sparse_step", "must be an integer >= 1")
        dense = sorted(hf.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            raise hf.error("mlp_only_layers", "codelm supports dense layers only as a prefix [0, 1, ..., k-1]")
        experts = hf.values.get("num_experts", hf.values.get("num_local_experts", hf.defaults["num_experts"]))
        moe = MoEConfig(
            num_experts=experts,
            experts_per_token=hf.get("num_experts_per_tok"),
            expert_d_ff=hf.get("moe_intermediate_size"),
            normalize_top_k=bool(hf.get("norm_topk_prob")),
            first_dense_layers=len(dense),
            sparse_step=step,
        )
        bias = bool(hf.get("attention_bias"))
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        return dict(qk_norm=True, qkv_bias=bias, out_bias=bias, sliding_window=window or 0, moe=moe)

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        assert cfg.moe is not None
        if cfg.qkv_bias != cfg.out_bias:
            raise ConfigError(f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}: {self.model_type} has one attention_bias")
        return {
            "attention_bias": cfg.qkv_bias,
            "use_sliding_window": bool(cfg.sliding_window),
            "sliding_window": cfg.sliding_window or None,
            "num_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.experts_per_token,
            "moe_intermediate_size": cfg.moe.expert_d_ff or cfg.d_ff,
            "norm_topk_prob": cfg.moe.normalize_top_k,
            "decoder_sparse_step": cfg.moe.sparse_step,
            "mlp_only_layers": list(range(cfg.moe.first_dense_layers)),
        }
