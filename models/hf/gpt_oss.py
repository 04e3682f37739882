"""gpt-oss (OpenAI's gpt-oss-20b / -120b): grouped-query attention with q/k/v/o biases and a learned
sink logit per head (`self_attn.sinks`, `ModelConfig.attention_sinks`), sliding-window (128) and full
layers alternating (`layer_types`), YaRN RoPE without rounding the ramp's ends (`truncate: false`),
and an MoE on every layer: a router with a bias whose top-k logits are softmaxed (codelm's softmax
router renormalised over the chosen experts, plus `moe.router_bias`), experts with biases and the
clamped SwiGLU (`mlp="clamped_swiglu"`, `swiglu_limit`). HF stores the experts fused, already in x @ W
layout: `gate_up_proj` [E, D, 2F] with gate and up interleaved on the last axis (codelm's expert
`up`, same layout), `down_proj` [E, F, D].
"""

import dataclasses
from typing import Any

from models.config import ConfigError, ModelConfig, MoEConfig
from models.hf.family import (
    Family,
    HFConfig,
    MoEFamily,
    TensorMap,
    layer_schedule_fields,
    rope_spec,
    write_layer_types,
    write_rope,
)
from models.hf.layouts import Same, Transposed

SWIGLU_ALPHA = 1.702  # models.moe.CLAMPED_SWIGLU_ALPHA; transformers keeps it as a config field


class GptOss(MoEFamily):
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    defaults = {  # transformers' GptOssConfig
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 150000.0,
        "sliding_window": 128,
        "layer_types": None,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "swiglu_alpha": SWIGLU_ALPHA,
        "swiglu_limit": 7.0,
        "attention_bias": True,
    }
    # transformers' default `rope_parameters` when a config.json has none.
    default_rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                    "original_max_position_embeddings": 4096}
    fixed = {**{k: v for k, v in Family.fixed.items() if k not in Family.SCHEDULE_FIELDS},
             "mlp": "clamped_swiglu", "mlp_bias": False, "attention_sinks": True}
    fixed_moe = {**MoEFamily.fixed_moe, "normalize_top_k": True, "router_bias": True, "expert_bias": True, "first_dense_layers": 0,
                 "sparse_step": 1}
    moe_prefix = "mlp"

    # -- config.json -> ModelConfig

    def config_fields(self, hf: HFConfig) -> dict[str, Any]:
        """`read_rope` with YaRN's `truncate` taken out first (codelm's RopeScaling has it)."""
        values = dict(hf.values)
        if not (values.get("rope_scaling") or values.get("rope_parameters")):
            values["rope_parameters"] = {**self.default_rope, "rope_theta": hf.get("rope_theta")}
        truncate = bool(rope_spec(HFConfig(values, hf.source, hf.defaults)).get("truncate", True))
        for key in ("rope_scaling", "rope_parameters"):
            if values.get(key):
                values[key] = {k: v for k, v in values[key].items() if k != "truncate"}
        fields = super().config_fields(HFConfig(values, hf.source, hf.defaults))
        if fields["rope_scaling"].kind == "yarn":
            fields["rope_scaling"] = dataclasses.replace(fields["rope_scaling"], truncate=truncate)
        return fields

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        hf.expect("swiglu_alpha", (SWIGLU_ALPHA,))
        n_layers = hf.get("num_hidden_layers")
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
        ]
        if len(layer_types) != n_layers:
            raise hf.error("layer_types", f"needs one entry per layer ({n_layers})")
        bias = bool(hf.get("attention_bias"))
        moe = MoEConfig(num_experts=hf.get("num_local_experts"), experts_per_token=hf.get("num_experts_per_tok"),
                        normalize_top_k=True, router_bias=True, expert_bias=True)
        return dict(qkv_bias=bias, out_bias=bias, mlp="clamped_swiglu", mlp_bias=False, attention_sinks=True,
                    swiglu_limit=float(hf.get("swiglu_limit")), moe=moe,
                    **layer_schedule_fields(hf.get("sliding_window"), list(layer_types), hf.source))

    # -- ModelConfig -> config.json

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        assert cfg.moe is not None
        if cfg.qkv_bias != cfg.out_bias:
            raise ConfigError(f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}: {self.model_type} has one attention_bias")
        if cfg.moe.expert_d_ff and cfg.moe.expert_d_ff != cfg.d_ff:
            raise ConfigError(f"moe.expert_d_ff={cfg.moe.expert_d_ff}: gpt-oss's experts are d_ff={cfg.d_ff} wide")
        rope = write_rope(cfg)
        if cfg.rope_scaling.kind == "yarn":
            rope = {key: {**rope[key], "truncate": cfg.rope_scaling.truncate} for key in ("rope_scaling", "rope_parameters")}
        return {
            **rope,
            "attention_bias": cfg.qkv_bias,
            "sliding_window": cfg.sliding_window or None,
            "layer_types": write_layer_types(cfg),
            "num_local_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.experts_per_token,
            "swiglu_alpha": SWIGLU_ALPHA,
            "swiglu_limit": cfg.swiglu_limit,
        }

    # -- tensors

    def attention_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        return super().attention_tensors(cfg) + [TensorMap(("attn", "sinks"), "self_attn.sinks", Same())]

    def moe_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        experts = f"{self.moe_prefix}.experts."
        return [
            TensorMap(("ffn", "router", "kernel"), f"{self.moe_prefix}.router.weight", Transposed()),
            TensorMap(("ffn", "router", "logit_bias"), f"{self.moe_prefix}.router.bias", Same()),
            TensorMap(("ffn", "experts", "up"), experts + "gate_up_proj", Same()),
            TensorMap(("ffn", "experts", "up_bias"), experts + "gate_up_proj_bias", Same()),
            TensorMap(("ffn", "experts", "down"), experts + "down_proj", Same()),
            TensorMap(("ffn", "experts", "down_bias"), experts + "down_proj_bias", Same()),
        ]
