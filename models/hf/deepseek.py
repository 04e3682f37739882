"""DeepSeek-V2 (DeepSeek-Coder-V2) and DeepSeek-V3: multi-head latent attention (`models.mla`) and
fine-grained MoE with shared experts after `first_k_dense_replace` dense layers.

V2 routes by softmax scores, greedily or within the best `topk_group` of `n_group` groups
(`topk_method: group_limited_greedy`, a group scored by its best expert), weights not renormalised
(transformers ignores V2's `norm_topk_prob`) and scaled by `routed_scaling_factor`. V3 routes by
sigmoid scores plus `e_score_correction_bias` (codelm's router bias, updated by the auxiliary-loss-free
rule when `moe.bias_update_rate` > 0), always group-limited (a group scored by its best two experts),
`norm_topk_prob` renormalising. Checkpoints store the RoPE query/key rows as interleaved pairs; import
reorders them to codelm's half-split RoPE (`layouts.RopeRows`). V3's multi-token-prediction layer
(`model.layers.<num_hidden_layers>.*`) is not imported.
"""

import math
from typing import Any, ClassVar

from models.config import ConfigError, MLAConfig, ModelConfig, MoEConfig
from models.hf.family import LAYER_PREFIX, Family, HFConfig, MoEFamily, TensorMap, rope_spec, write_rope, yarn_mscale
from models.hf.layouts import HeadsIn, HeadsOut, RopeRows, Same, Transposed
from models.hf.llama import Llama


class DeepseekV2(MoEFamily):
    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    defaults = {
        **Llama.defaults,
        "first_k_dense_replace": 0,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": None,
        "moe_intermediate_size": 1407,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "n_group": None,
        "topk_group": None,
        "norm_topk_prob": False,
    }
    fixed = {**{k: v for k, v in Family.fixed.items() if k != "mla"}, "qkv_bias": False, "out_bias": False, "mlp_bias": False}
    fixed_moe: ClassVar[dict[str, Any]] = {"router": "softmax", "normalize_top_k": False, "sparse_step": 1,
                                           "bias_update_rate": 0.0}
    moe_prefix = "mlp"
    expert_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    yarn_attention_factor = True

    # -- config.json -> ModelConfig

    def config_fields(self, hf: HFConfig) -> dict[str, Any]:
        fields = super().config_fields(hf)
        fields.update(n_kv_heads=fields["n_heads"], head_dim=hf.get("qk_rope_head_dim"))  # MLA: one key per head
        return fields

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise hf.error(flag, "codelm's DeepSeek layers have no biases")
        # DeepSeek's YaRN also sharpens the softmax by mscale(factor, mscale_all_dim)^2 (transformers'
        # yarn_apply_mscale); the cos/sin factor is read by `read_rope`.
        spec = rope_spec(hf)
        all_dim = spec.get("mscale_all_dim") if spec.get("rope_type", spec.get("type")) not in (None, "default") else None
        mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf.get("kv_lora_rank"),
                        qk_nope_head_dim=hf.get("qk_nope_head_dim"), qk_rope_head_dim=hf.get("qk_rope_head_dim"),
                        v_head_dim=hf.get("v_head_dim"),
                        score_scale=yarn_mscale(float(spec["factor"]), all_dim) ** 2 if all_dim else 1.0)
        return dict(qkv_bias=False, out_bias=False, mlp_bias=False, mla=mla, moe=MoEConfig(**self.moe_fields(hf)))

    def expert_fields(self, hf: HFConfig) -> dict[str, Any]:
        """The MoE fields both DeepSeek versions spell the same way."""
        if hf.get("n_routed_experts") is None:
            raise hf.error("n_routed_experts", "codelm imports the MoE DeepSeek models (a number of routed experts)")
        return dict(
            num_experts=hf.get("n_routed_experts"),
            experts_per_token=hf.get("num_experts_per_tok"),
            expert_d_ff=hf.get("moe_intermediate_size"),
            num_shared_experts=hf.get("n_shared_experts") or 0,
            first_dense_layers=hf.get("first_k_dense_replace") or 0,
            routed_scaling=float(hf.get("routed_scaling_factor")),
        )

    def moe_fields(self, hf: HFConfig) -> dict[str, Any]:
        experts = self.expert_fields(hf)
        if hf.values.get("moe_layer_freq", 1) != 1:
            raise hf.error("moe_layer_freq", "codelm supports 1 (every layer after first_k_dense_replace is MoE)")
        method = hf.expect("topk_method", ("greedy", "group_limited_greedy"))
        if hf.get("norm_topk_prob"):
            raise hf.error("norm_topk_prob", "transformers' DeepSeek-V2 never renormalises; a true value would "
                           "mean something different from the reference implementation")
        grouped = method == "group_limited_greedy"
        return dict(experts, router="softmax", normalize_top_k=False, num_groups=hf.get("n_group") if grouped else 1,
                    topk_groups=hf.get("topk_group") if grouped else 1)

    # -- ModelConfig -> config.json

    def check_exportable(self, cfg: ModelConfig) -> None:
        if cfg.mla is None:
            raise ConfigError(f"mla: {self.model_type} uses multi-head latent attention; the config has none")
        super().check_exportable(cfg)

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        assert cfg.mla is not None and cfg.moe is not None
        m, moe = cfg.mla, cfg.moe
        return {
            **self.yarn_mscale_config(cfg),
            "attention_bias": False,
            "mlp_bias": False,
            "q_lora_rank": m.q_lora_rank or None,
            "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim,
            "head_dim": m.qk_rope_head_dim,
            "n_routed_experts": moe.num_experts,
            "num_experts_per_tok": moe.experts_per_token,
            "moe_intermediate_size": moe.expert_d_ff or cfg.d_ff,
            "n_shared_experts": moe.num_shared_experts,
            "first_k_dense_replace": moe.first_dense_layers,
            "routed_scaling_factor": moe.routed_scaling,
            **self.routing_config(moe),
        }

    def yarn_mscale_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """Both RoPE spellings with `mscale` / `mscale_all_dim` that give back the score scale and the
        cos/sin factor (`family_fields` inverted), when they differ from YaRN's defaults."""
        assert cfg.mla is not None
        s = cfg.rope_scaling
        if s.kind != "yarn" and cfg.mla.score_scale != 1.0:
            raise ConfigError(f"mla.score_scale={cfg.mla.score_scale}: {self.model_type} sets it only through YaRN's mscale_all_dim")
        if s.kind != "yarn" or (cfg.mla.score_scale == 1.0 and not s.attention_factor):
            return {}
        log_factor = 0.1 * math.log(s.factor)
        all_dim = math.sqrt(cfg.mla.score_scale)
        attention = (s.attention_factor or yarn_mscale(s.factor)) * all_dim
        mscale = {"mscale": (attention - 1) / log_factor, "mscale_all_dim": (all_dim - 1) / log_factor}
        rope = write_rope(cfg)
        return {"rope_scaling": {**rope["rope_scaling"], **mscale}, "rope_parameters": {**rope["rope_parameters"], **mscale}}

    def routing_config(self, moe: MoEConfig) -> dict[str, Any]:
        grouped = moe.num_groups > 1
        return {"topk_method": "group_limited_greedy" if grouped else "greedy", "norm_topk_prob": False,
                "n_group": moe.num_groups if grouped else None, "topk_group": moe.topk_groups if grouped else None}

    # -- tensors

    def attention_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        assert cfg.mla is not None
        m, n = cfg.mla, cfg.n_heads
        query = RopeRows(HeadsIn(n, m.qk_head_dim), m.qk_head_dim, m.qk_rope_head_dim)
        if m.q_lora_rank:
            tensors = [TensorMap(("attn", "q_a_proj"), "self_attn.q_a_proj.weight", Transposed()),
                       TensorMap(("attn", "q_norm", "scale"), "self_attn.q_a_layernorm.weight", Same()),
                       TensorMap(("attn", "q_b_proj"), "self_attn.q_b_proj.weight", query)]
        else:
            tensors = [TensorMap(("attn", "q_proj"), "self_attn.q_proj.weight", query)]
        latent = m.kv_lora_rank + m.qk_rope_head_dim
        return tensors + [
            TensorMap(("attn", "kv_a_proj"), "self_attn.kv_a_proj_with_mqa.weight",
                      RopeRows(Transposed(), latent, m.qk_rope_head_dim)),
            TensorMap(("attn", "kv_norm", "scale"), "self_attn.kv_a_layernorm.weight", Same()),
            TensorMap(("attn", "kv_b_proj"), "self_attn.kv_b_proj.weight", HeadsIn(n, m.qk_nope_head_dim + m.v_head_dim)),
            TensorMap(("attn", "o_proj"), "self_attn.o_proj.weight", HeadsOut(n, m.v_head_dim)),
        ]

    def moe_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        assert cfg.moe is not None
        shared = [TensorMap(("ffn", "shared_experts", f"{p}_proj"), f"mlp.shared_experts.{p}_proj.weight", Transposed())
                  for p in ("gate", "up", "down")] if cfg.moe.num_shared_experts else []
        return super().moe_tensors(cfg) + shared

    def ignores(self, name: str, cfg: ModelConfig) -> bool:
        return super().ignores(name, cfg) or name.startswith(LAYER_PREFIX.format(layer=cfg.n_layers))


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    defaults = {
        **DeepseekV2.defaults,
        "max_position_embeddings": 4096,
        "first_k_dense_replace": 3,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "rope_interleave": True,
    }
    fixed_moe = {"router": "sigmoid", "sparse_step": 1}

    def moe_fields(self, hf: HFConfig) -> dict[str, Any]:
        hf.expect("rope_interleave", (True,))  # every released checkpoint; the layout import assumes it
        return dict(self.expert_fields(hf), router="sigmoid", normalize_top_k=bool(hf.get("norm_topk_prob")),
                    num_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1)

    def routing_config(self, moe: MoEConfig) -> dict[str, Any]:
        return {"norm_topk_prob": moe.normalize_top_k, "n_group": moe.num_groups, "topk_group": moe.topk_groups,
                "rope_interleave": True}

    def moe_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        bias = TensorMap(("ffn", "router", "bias"), f"{self.moe_prefix}.gate.e_score_correction_bias", Same())
        return super().moe_tensors(cfg) + [bias]
