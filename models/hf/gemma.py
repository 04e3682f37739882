"""Gemma (CodeGemma) and Gemma 2: the Llama layout with a tanh-GELU gated MLP (GeGLU), embeddings
scaled by sqrt(hidden_size), RMSNorm weights stored as (scale - 1) (`norm_scale_offset`) and tied
embeddings. Gemma 2 adds a second norm after attention and after the MLP
(`post_attention_layernorm` / `post_feedforward_layernorm`, the MLP's pre-norm then being
`pre_feedforward_layernorm`), scores scaled by 1 / sqrt(query_pre_attn_scalar), soft-capped attention
scores and final logits, and alternating sliding-window and global layers (`layer_types`). Gemma 3
(`gemma3_text`, the language model of Gemma 3) adds QK-norm and gives its sliding-window layers their
own RoPE base (`rope_local_base_freq`), the global layers keeping `rope_theta` and any scaling.
"""

from typing import Any

from models.config import ConfigError, ModelConfig
from models.hf.family import Family, HFConfig, TensorMap, layer_schedule_fields, write_layer_types, write_rope
from models.hf.layouts import Same

# transformers' name of the tanh-approximated GELU, codelm's GELU; Gemma releases wrote "gelu" for it
# (transformers' GemmaConfig reads that as the tanh approximation too).
GELU_TANH = "gelu_pytorch_tanh"
GEMMA_FIELDS = {"mlp": "geglu", "mlp_bias": False, "scale_embeddings": True, "norm_scale_offset": 1.0}
# The ModelConfig fields Gemma 2's config.json sets (besides its layer schedule).
GEMMA2_FIELDS = ("query_pre_attn_scalar", "attn_logit_softcap", "logit_softcap")


class Gemma(Family):
    model_type = "gemma"
    architecture = "GemmaForCausalLM"
    activations = (GELU_TANH, "gelu")
    defaults = {
        "hidden_act": GELU_TANH,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "rope_theta": 10000.0,
        "use_bidirectional_attention": None,
    }
    fixed = {**Family.fixed, **GEMMA_FIELDS}

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        hf.expect("use_bidirectional_attention", (None, False))
        bias = bool(hf.get("attention_bias"))
        return dict(qkv_bias=bias, out_bias=bias, **GEMMA_FIELDS)

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        return {k: v for k, v in super().family_config(cfg).items() if k != "mlp_bias"}  # Gemma's MLP has no bias


class Gemma2(Gemma):
    model_type = "gemma2"
    architecture = "Gemma2ForCausalLM"
    activations = (GELU_TANH,)
    activation_key = "hidden_activation"
    defaults = {
        **Gemma.defaults,
        "hidden_activation": GELU_TANH,
        "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "layer_types": None,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    }
    fixed = {**{k: v for k, v in Gemma.fixed.items() if k not in Family.SCHEDULE_FIELDS + GEMMA2_FIELDS},
             "post_norms": True}

    def sliding_window_pattern(self, hf: HFConfig) -> int:
        """With no `layer_types`: every k-th layer is global, the others slide."""
        return 2

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        hf.expect(self.activation_key, self.activations)
        n_layers, k = hf.get("num_hidden_layers"), self.sliding_window_pattern(hf)
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % k == 0 else "sliding_attention" for i in range(n_layers)
        ]
        if len(layer_types) != n_layers:
            raise hf.error("layer_types", f"needs one entry per layer ({n_layers})")
        return dict(
            super().family_fields(hf),
            post_norms=True,
            query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar")),
            attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
            logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
            **layer_schedule_fields(hf.get("sliding_window"), list(layer_types), hf.source),
        )

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.qkv_bias != cfg.out_bias:
            raise ConfigError(f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}: {self.model_type} has one attention_bias")
        layer_types = write_layer_types(cfg)
        return {
            "attention_bias": cfg.qkv_bias,
            self.activation_key: self.activations[0],
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
            "attn_logit_softcapping": cfg.attn_logit_softcap or None,
            "final_logit_softcapping": cfg.logit_softcap or None,
            "sliding_window": cfg.sliding_window if "sliding_attention" in layer_types else None,
            "layer_types": layer_types,
        }

    def norm_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        return [TensorMap((codelm, "scale"), f"{hf}.weight", Same()) for codelm, hf in (
            ("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffn_norm", "post_feedforward_layernorm"),
        )]


class Gemma3Text(Gemma2):
    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"
    defaults = {
        **Gemma2.defaults,
        "max_position_embeddings": 131072,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "sliding_window_pattern": 6,
        "use_bidirectional_attention": False,
    }
    fixed = {**{k: v for k, v in Gemma2.fixed.items() if k != "sliding_rope_theta"}, "qk_norm": True}

    def sliding_window_pattern(self, hf: HFConfig) -> int:
        return hf.get("sliding_window_pattern")

    def config_fields(self, hf: HFConfig) -> dict[str, Any]:
        """RoPE per layer type: transformers 5 nests `rope_parameters` by layer type; older files have
        `rope_theta` and `rope_scaling` for the global layers and `rope_local_base_freq` for the others."""
        params = hf.values.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:
            full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        else:
            full = {**(hf.values.get("rope_scaling") or params), "rope_theta": hf.get("rope_theta")}
            sliding = {"rope_theta": hf.get("rope_local_base_freq")}
        if sliding.get("rope_type", "default") != "default":
            raise hf.error("rope_parameters", "codelm's sliding-window layers take unscaled RoPE (rope_type default)")
        global_rope = {**hf.values, "rope_scaling": None, "rope_theta": None, "rope_parameters": full}
        fields = super().config_fields(HFConfig(global_rope, hf.source, self.defaults))
        return dict(fields, qk_norm=True, sliding_rope_theta=float(sliding.get("rope_theta") or hf.get("rope_local_base_freq")))

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        sliding_theta = cfg.sliding_rope_theta or cfg.rope_theta
        full = write_rope(cfg)
        return dict(
            super().family_config(cfg),
            rope_local_base_freq=sliding_theta,
            rope_parameters={"full_attention": full["rope_parameters"],
                             "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta}},
        )
