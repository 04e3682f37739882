"""Model configuration: one dataclass for every decoder codelm builds, named presets, validation.

A `ModelConfig` is pure data. `models.decoder.Decoder` turns it into parameters; `param_count()` and
`flops_per_token()` turn it into the numbers MFU and scaling-law work need, without building anything.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from configs.schema import ConfigError, unknown_field

NORMS = ("rms", "layer")
MLPS = ("swiglu", "geglu", "gelu", "clamped_swiglu")
GATED_MLPS = ("swiglu", "geglu", "clamped_swiglu")  # down(act(gate x, up x)): three matrices
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
ATTENTION_IMPLS = ("xla", "chunked", "blockwise", "cudnn", "splash", "tokamax", "ring")  # kernels: models/attention
SINK_ATTENTION_IMPLS = ("xla", "chunked", "blockwise")  # the kernels that take attention sinks
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
ROUTERS = ("softmax", "sigmoid")
MOE_IMPLS = ("dropless", "capacity")
LORA_INITS = ("he_uniform", "he_normal")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' `layer_types` spelling



def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _check_choice(value: Any, field: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, field, f"got {value!r}, allowed values are {', '.join(choices)}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in Hugging Face's `rope_scaling`.

    kind: "none"; "linear" (positions divided by `factor`, CodeLlama/DeepSeek-Coder); "llama3"
    (frequency-band interpolation, Llama 3.1); "yarn" (NTK-by-parts plus attention temperature,
    Peng et al. 2023).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_position: int = 8192  # llama3 and yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    # yarn: the cos/sin scale; 0: 0.1 * ln(factor) + 1. DeepSeek's mscale / mscale_all_dim set it (to 1
    # for every release); read by multi-head latent attention only (models/mla.py).
    attention_factor: float = 0.0
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions (gpt-oss: false)

    def validate(self, prefix: str = "rope_scaling") -> None:
        _check_choice(self.kind, f"{prefix}.kind", ROPE_SCALINGS)
        _check(self.factor >= 1.0, f"{prefix}.factor", f"must be >= 1, got {self.factor}")
        _check(self.original_max_position > 0, f"{prefix}.original_max_position", "must be > 0")
        _check(self.attention_factor >= 0, f"{prefix}.attention_factor", "must be >= 0 (0: YaRN's default)")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward settings (used by layers at index >= `first_dense_layers`).

    Routing: logits = x @ W_router in float32. router="softmax": scores = softmax(logits) (Mixtral,
    Qwen3-MoE, OLMoE, DeepSeekMoE); router="sigmoid": scores = sigmoid(logits) (DeepSeek-V3). The
    top `experts_per_token` experts by scores + selection bias are chosen; their combine weights are
    the chosen scores, divided by their sum when `normalize_top_k`, times `routed_scaling`.
    `expert_bias` gives the routed experts' projections biases; `router_bias` adds a learned [E] bias to the logits (gpt-oss: softmax router, normalize_top_k,
    i.e. softmax over the chosen experts' logits).
    Execution (`impl`): "dropless" sorts tokens by expert and runs grouped matmuls with the
    `grouped_matmul` kernel ("auto": XLA's ragged_dot on TPU, the tiled kernel elsewhere; see
    models/moe.py); "capacity" gives every expert capacity_factor * tokens * top_k / experts slots
    per device and drops assignments beyond it.
    Balancing: `aux_loss_coef` (Switch load-balancing loss), `router_z_loss_coef` (ST-MoE z-loss),
    `bias_update_rate` (DeepSeek-V3 auxiliary-loss-free bias; 0 disables).
    """

    num_experts: int = 8
    experts_per_token: int = 2
    expert_d_ff: int = 0  # 0: use the model's d_ff
    num_shared_experts: int = 0  # always-on experts, run as one MLP of width num_shared_experts * expert_d_ff
    first_dense_layers: int = 0
    router: str = "softmax"  # softmax top-k (Mixtral, Qwen3-MoE) or sigmoid (DeepSeek-V3)
    normalize_top_k: bool = True  # renormalise the selected experts' weights to sum to 1
    routed_scaling: float = 1.0
    impl: str = "dropless"
    grouped_matmul: str = "auto"  # dropless kernel: "auto", "ragged_dot", "tiled", or a registered name
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # DeepSeek-V3 auxiliary-loss-free balancing; 0 disables
    sparse_step: int = 1  # after the dense prefix, layer i is MoE iff (i + 1) % sparse_step == 0 (Qwen-MoE)
    num_groups: int = 1  # group-limited routing: experts in `num_groups` groups, tokens pick from
    topk_groups: int = 1  # the best `topk_groups` of them (DeepSeek-V2 / V3); 1 group: plain top-k
    router_bias: bool = False  # a learned bias added to the router logits (gpt-oss)
    expert_bias: bool = False  # biases on the routed experts' projections (gpt-oss)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers and (layer + 1) % self.sparse_step == 0

    def validate(self, n_layers: int, prefix: str = "moe") -> None:
        _check(self.num_experts >= 1, f"{prefix}.num_experts", "must be >= 1")
        _check(
            1 <= self.experts_per_token <= self.num_experts,
            f"{prefix}.experts_per_token",
            f"must be in [1, num_experts={self.num_experts}], got {self.experts_per_token}",
        )
        _check(self.expert_d_ff >= 0, f"{prefix}.expert_d_ff", "must be >= 0")
        _check(self.num_shared_experts >= 0, f"{prefix}.num_shared_experts", "must be >= 0")
        _check(
            0 <= self.first_dense_layers <= n_layers,
            f"{prefix}.first_dense_layers",
            f"must be in [0, n_layers={n_layers}]",
        )
        _check_choice(self.router, f"{prefix}.router", ROUTERS)
        _check_choice(self.impl, f"{prefix}.impl", MOE_IMPLS)
        _check(bool(self.grouped_matmul), f"{prefix}.grouped_matmul", "must name a kernel")
        _check(self.routed_scaling > 0, f"{prefix}.routed_scaling", "must be > 0")
        _check(self.capacity_factor > 0, f"{prefix}.capacity_factor", "must be > 0")
        for coef in ("aux_loss_coef", "router_z_loss_coef", "bias_update_rate"):
            _check(getattr(self, coef) >= 0, f"{prefix}.{coef}", f"must be >= 0, got {getattr(self, coef)}")
        _check(self.sparse_step >= 1, f"{prefix}.sparse_step", f"must be >= 1, got {self.sparse_step}")
        _check(
            self.num_groups >= 1 and self.num_experts % self.num_groups == 0,
            f"{prefix}.num_groups",
            f"must divide num_experts={self.num_experts}, got {self.num_groups}",
        )
        _check(
            1 <= self.topk_groups <= self.num_groups,
            f"{prefix}.topk_groups",
            f"must be in [1, num_groups={self.num_groups}], got {self.topk_groups}",
        )
        _check(
            self.topk_groups * (self.num_experts // self.num_groups) >= self.experts_per_token,
            f"{prefix}.topk_groups",
            f"{self.topk_groups} groups of {self.num_experts // self.num_groups} experts hold fewer than "
            f"experts_per_token={self.experts_per_token}",
        )


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, sec. 2.1; models/mla.py).

    Queries: x -> [q_lora_rank] -> RMSNorm -> N heads of qk_nope_head_dim + qk_rope_head_dim
    (q_lora_rank 0: one full-rank projection). Keys and values: x -> a latent c of kv_lora_rank
    (RMS-normed) plus one RoPE key of qk_rope_head_dim shared by all heads; c -> N heads of
    qk_nope_head_dim (keys, without position) and v_head_dim (values). The KV cache holds c and the
    RoPE key only: kv_lora_rank + qk_rope_head_dim numbers per token and layer.
    """

    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    score_scale: float = 1.0  # scores are q.k / sqrt(qk_head_dim) * score_scale (DeepSeek YaRN: mscale^2)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, prefix: str = "mla") -> None:
        _check(self.q_lora_rank >= 0, f"{prefix}.q_lora_rank", "must be >= 0 (0: a full-rank query projection)")
        for field in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _check(getattr(self, field) > 0, f"{prefix}.{field}", f"must be > 0, got {getattr(self, field)}")
        _check(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            f"{prefix}.qk_rope_head_dim",
            f"must be a positive even integer, got {self.qk_rope_head_dim}",
        )
        _check(self.score_scale > 0, f"{prefix}.score_scale", f"must be > 0, got {self.score_scale}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on the weights whose paths match `targets`.

    A targeted weight W gets A [in..., rank] (`init`: He/Kaiming uniform or normal over the input
    dims) and B [rank, out...] (zeros) as `nnx.LoRAParam`s, and computes
    y = x W + dropout(x) A B * alpha / rank; MoE expert weights get one A, B pair per expert.
    targets: regular expressions, each matched in full against the end of a weight's path in the
    decoder with layer indices left out, e.g. "attn/q_proj" matches "stacks/dense/blocks/attn/q_proj".
    Paths: attn/{q,k,v,o}_proj, ffn/mlp/{gate,up,down}_proj (dense layers),
    ffn/experts/{gate,up,down} (routed experts), ffn/shared_experts/{gate,up,down}_proj; the stacks
    are "dense" and "moe" (so "moe/.*attn/q_proj" targets the MoE layers' queries only). Every
    pattern must match some weight. A comma-separated string is accepted (command lines).
    The defaults target every projection and expert matrix (QLoRA, Dettmers et al. 2023, sec. 4).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (r"attn/[qkvo]_proj", r"(mlp|experts|shared_experts)/(gate|up|down)(_proj)?")
    init: str = "he_uniform"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        elif not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, prefix: str = "lora") -> None:
        _check(isinstance(self.rank, int) and self.rank >= 1, f"{prefix}.rank", f"must be an integer >= 1, got {self.rank!r}")
        _check(self.alpha > 0, f"{prefix}.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}")
        _check_choice(self.init, f"{prefix}.init", LORA_INITS)
        _check(bool(self.targets), f"{prefix}.targets", "must name at least one weight pattern")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{prefix}.targets: {pattern!r} is not a regular expression ({e})") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only transformer.

    The fields cover Llama (DeepSeek-Coder, CodeLlama), Qwen2/2.5, Qwen3, Mistral, StarCoder2 and
    Gemma 1-3: norm type, QKV / projection biases, QK-norm, sliding windows, SwiGLU, GeGLU or
    GELU MLPs, tied embeddings, Gemma's scaled embeddings, post-norms and soft-capping; with `moe`,
    `mla`, attention sinks and the clamped SwiGLU, the DeepSeek and gpt-oss MoE models.
    """

    name: str = "custom"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 1408
    norm: str = "rms"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    sliding_window: int = 0  # 0: full causal attention
    # Per-layer attention: "full_attention" / "sliding_attention" (window `sliding_window`) per layer,
    # as transformers writes `layer_types`; empty: every layer has `sliding_window`, unless
    # `global_every` > 0 makes layer i full iff (i + 1) % global_every == 0 and the others sliding.
    layer_types: tuple[str, ...] = ()
    global_every: int = 0
    tie_embeddings: bool = False
    logit_softcap: float = 0.0  # 0: off; else logits = cap * tanh(logits / cap)
    # Gemma: attention scores q.k / sqrt(query_pre_attn_scalar) (0: head_dim), then soft-capped at
    # cap * tanh(score / cap) (0: off); embeddings times sqrt(d_model) (the factor in the compute
    # dtype); the attention and MLP outputs normalised again before the residual add (post_norms);
    # RMSNorm multiplying by (norm_scale_offset + scale), Gemma's stored scale being 1 less; Gemma 3's
    # sliding-window layers rotate by their own RoPE base, unscaled (sliding_rope_theta; 0: rope_theta).
    query_pre_attn_scalar: int = 0
    attn_logit_softcap: float = 0.0
    scale_embeddings: bool = False
    post_norms: bool = False
    norm_scale_offset: float = 0.0
    sliding_rope_theta: float = 0.0
    # gpt-oss: a learned logit per head that joins every query's softmax denominator and adds no value
    # (an "attention sink", Xiao et al. 2023; models/attention/mask.py); experts whose MLP is
    # mlp="clamped_swiglu": (clip(up, +-limit) + 1) * g * sigmoid(1.702 g), g = min(gate, limit).
    attention_sinks: bool = False
    swiglu_limit: float = 7.0  # clamped_swiglu's clamp
    max_seq_len: int = 4096
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "full"
    attention_impl: str = "xla"
    cross_entropy_chunk: int = 0  # tokens per row whose logits exist at once in the loss (0: all; train/step.py)
    # DeepSeek-V3 multi-token prediction (models/mtp.py), for training only: depth k = 1..mtp_depth adds
    # one block predicting the token k + 1 ahead; the loss adds mtp_loss_weight times the depths' mean
    # cross-entropy (the paper's lambda: 0.3, then 0.1 for the last third of pretraining).
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.1
    moe: MoEConfig | None = None
    lora: LoRAConfig | None = None  # None: no adapters (models/lora.py)
    mla: MLAConfig | None = None  # None: grouped-query attention; else multi-head latent attention

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.moe, Mapping):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        if isinstance(self.mla, Mapping):
            object.__setattr__(self, "mla", MLAConfig(**self.mla))
        if isinstance(self.layer_types, str):
            object.__setattr__(self, "layer_types", tuple(t.strip() for t in self.layer_types.split(",") if t.strip()))
        elif not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.head_dim == 0 and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        self.validate()

    def validate(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, field)
            _check(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")
        _check(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}",
        )
        _check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", f"must be a positive even integer, got {self.head_dim}")
        _check_choice(self.norm, "norm", NORMS)
        _check_choice(self.mlp, "mlp", MLPS)
        _check_choice(self.dtype, "dtype", DTYPES)
        _check_choice(self.param_dtype, "param_dtype", DTYPES)
        _check_choice(self.remat, "remat", REMAT_POLICIES)
        _check_choice(self.attention_impl, "attention_impl", ATTENTION_IMPLS)
        _check(self.cross_entropy_chunk >= 0, "cross_entropy_chunk", "must be >= 0 (0: whole logits)")
        _check(self.mtp_depth >= 0, "mtp_depth", "must be >= 0 (0: no multi-token prediction)")
        _check(self.mtp_loss_weight >= 0, "mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")
        _check(self.norm_eps > 0, "norm_eps", "must be > 0")
        _check(self.rope_theta > 0, "rope_theta", "must be > 0")
        _check(self.sliding_window >= 0, "sliding_window", "must be >= 0 (0 disables it)")
        _check(self.logit_softcap >= 0, "logit_softcap", "must be >= 0 (0 disables it)")
        _check(self.attn_logit_softcap >= 0, "attn_logit_softcap", "must be >= 0 (0 disables it)")
        _check(self.query_pre_attn_scalar >= 0, "query_pre_attn_scalar", "must be >= 0 (0: head_dim)")
        _check(self.norm == "rms" or not self.norm_scale_offset, "norm_scale_offset", "applies to RMSNorm only")
        _check(self.sliding_rope_theta >= 0, "sliding_rope_theta", "must be >= 0 (0: rope_theta)")
        _check(self.moe is None or self.mlp != "geglu", "mlp", "MoE experts are swiglu, clamped_swiglu or gelu")
        _check(self.swiglu_limit > 0, "swiglu_limit", f"must be > 0, got {self.swiglu_limit}")
        if self.mlp == "clamped_swiglu":  # gpt-oss's expert activation; its models have no dense MLP
            _check(self.moe is not None and self.n_moe_layers == self.n_layers and not self.moe.num_shared_experts,
                   "mlp", "clamped_swiglu is an expert activation: it needs moe on every layer and no shared experts")
        if self.attention_sinks:
            _check(self.attention_impl in SINK_ATTENTION_IMPLS, "attention_impl",
                   f"attention_sinks needs a kernel that takes them ({', '.join(SINK_ATTENTION_IMPLS)}), "
                   f"got {self.attention_impl!r}")
            _check(self.mla is None, "attention_sinks", "multi-head latent attention has no sinks")
        self.rope_scaling.validate()
        if self.layer_types:
            _check(len(self.layer_types) == self.n_layers, "layer_types",
                   f"needs one entry per layer ({self.n_layers}), got {len(self.layer_types)}")
            for kind in self.layer_types:
                _check_choice(kind, "layer_types", LAYER_TYPES)
        _check(self.global_every >= 0, "global_every", "must be >= 0 (0 disables it)")
        _check(not (self.layer_types and self.global_every), "global_every", "set layer_types or global_every, not both")
        _check(
            self.sliding_window > 0 or not (self.global_every or "sliding_attention" in self.layer_types),
            "sliding_window", "sliding_attention layers need a window > 0",
        )
        if self.moe is not None:
            self.moe.validate(self.n_layers)
        if self.lora is not None:
            self.lora.validate()
        if self.mla is not None:
            self.mla.validate()
            _check(self.n_kv_heads == self.n_heads, "n_kv_heads", "multi-head latent attention has one key/value head per query head")
            _check(not (self.qkv_bias or self.out_bias or self.qk_norm), "mla",
                   "multi-head latent attention has no qkv_bias, out_bias or qk_norm")
            _check(not (self.query_pre_attn_scalar or self.attn_logit_softcap or self.norm_scale_offset
                        or self.sliding_rope_theta), "mla", "multi-head latent attention has no query_pre_attn_scalar, "
                   "attn_logit_softcap, norm_scale_offset or sliding_rope_theta")
        _check(self.mla is not None or not self.rope_scaling.attention_factor, "rope_scaling.attention_factor",
               "only multi-head latent attention reads it; leave it 0")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_window(self, layer: int) -> int:
        """The sliding window of layer `layer` (0: full attention), from the layer schedule."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0
        if self.global_every:
            return 0 if (layer + 1) % self.global_every == 0 else self.sliding_window
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer)

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    def _attention_params(self) -> int:
        if self.mla is not None:
            return self._mla_params()
        d, q, kv = self.d_model, self.q_dim, self.kv_dim
        weights = d * q + 2 * d * kv + q * d
        biases = (q + 2 * kv if self.qkv_bias else 0) + (d if self.out_bias else 0)
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        sinks = self.n_heads if self.attention_sinks else 0
        return weights + biases + qk_norm + sinks

    def _mla_params(self) -> int:
        assert self.mla is not None
        m, d, n = self.mla, self.d_model, self.n_heads
        if m.q_lora_rank:
            query = d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * m.qk_head_dim
        else:
            query = d * n * m.qk_head_dim
        latent = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        up = m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
        return query + latent + up + n * m.v_head_dim * d

    def _mlp_params(self, d_ff: int, bias: bool | None = None) -> int:
        d, bias = self.d_model, self.mlp_bias if bias is None else bias
        if self.mlp in GATED_MLPS:
            return 3 * d * d_ff + (2 * d_ff + d if bias else 0)
        return 2 * d * d_ff + (d_ff + d if bias else 0)

    def _norm_params(self) -> int:
        return self.d_model * (2 if self.norm == "layer" else 1)

    def _expert_d_ff(self) -> int:
        assert self.moe is not None
        return self.moe.expert_d_ff or self.d_ff

    def _moe_ffn_params(self, active: bool) -> int:
        assert self.moe is not None
        m = self.moe
        experts = m.experts_per_token if active else m.num_experts
        router = (self.d_model + m.router_bias) * m.num_experts
        f = self._expert_d_ff()
        return router + experts * self._mlp_params(f, m.expert_bias) + m.num_shared_experts * self._mlp_params(f)

    def param_count(self, *, active: bool = False, embeddings: bool = True) -> int:
        """Number of parameters, computed from the shapes the decoder builds.

        active: for MoE, count only the routed experts a token uses (plus shared experts and router).
        embeddings: include the input embedding (and the LM head when untied).
        """
        block_common = self._attention_params() + (4 if self.post_norms else 2) * self._norm_params()
        total = self.n_layers * block_common + self.n_dense_layers * self._mlp_params(self.d_ff)
        if self.n_moe_layers:
            total += self.n_moe_layers * self._moe_ffn_params(active)
        total += self._norm_params()  # final norm
        if self.mtp_depth:  # per depth: the last layer's block, three norms and the [2D, D] projection
            last_ffn = self._moe_ffn_params(active) if self.is_moe_layer(self.n_layers - 1) else self._mlp_params(self.d_ff)
            total += self.mtp_depth * (block_common + last_ffn + 3 * self._norm_params() + 2 * self.d_model**2)
        if embeddings:
            total += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return total

    def matmul_params_per_token(self) -> int:
        """Parameters a token multiplies by in a forward pass: active non-embedding weights plus the LM head.

        The input embedding is a gather, not a matmul, so it is excluded; the LM head is a matmul
        whether or not it is tied to the embedding. Multi-token prediction (training only) adds its
        depths' blocks and projections, and one more LM head per depth.
        """
        return self.param_count(active=True, embeddings=False) + (1 + self.mtp_depth) * self.vocab_size * self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        Formula (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B):
            6 * N_matmul + sum over layers of 6 * n_heads * (qk_head_dim + v_head_dim) * T_attn
        N_matmul is `matmul_params_per_token()` (active parameters for MoE, LM head included,
        embedding gather excluded); the second term is QK^T and AV over T_attn keys, forward (2 FLOPs
        per multiply-add) times 3 for the backward pass; qk_head_dim = v_head_dim = head_dim except
        under MLA. T_attn = seq_len, or the layer's sliding window when smaller; multi-token-prediction
        blocks count as layers with the last layer's window. Like PaLM, the full
        attention matrix is counted (no discount for causal masking).
        """
        qk, v = (self.mla.qk_head_dim, self.mla.v_head_dim) if self.mla else (self.head_dim, self.head_dim)
        windows = [self.layer_window(i) for i in range(self.n_layers)] + [self.layer_window(self.n_layers - 1)] * self.mtp_depth
        t_attn = sum(min(seq_len, w) if w else seq_len for w in windows)
        return 6.0 * self.matmul_params_per_token() + 6.0 * self.n_heads * (qk + v) * t_attn


# ---- presets ---------------------------------------------------------------------------------------

_LLAMA_GRID = {
    # name: (d_model, n_layers, n_heads); d_ff = 8/3 d rounded up to 128; ~12 * L * d^2 non-embedding.
    "llama-10m": (256, 12, 4),
    "llama-25m": (384, 14, 6),
    "llama-50m": (512, 16, 8),
    "llama-100m": (640, 20, 10),
    "llama-200m": (1024, 16, 16),
    "llama-400m": (1280, 20, 10),
    "llama-800m": (1536, 28, 12),
    "llama-1.5b": (2048, 30, 16),
    "llama-3b": (2560, 38, 20),
}


def _grid_preset(name: str, d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=32768,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=128 * math.ceil(8 * d_model / 3 / 128),
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=2048,
    )


def _real_presets() -> dict[str, ModelConfig]:
    """Shapes of released models (from their Hugging Face config.json files)."""
    qwen2 = dict(norm_eps=1e-6, qkv_bias=True, rope_theta=1_000_000.0, max_seq_len=32768)
    llama = dict(norm_eps=1e-6)
    presets = [
        ModelConfig(name="deepseek-coder-1.3b", vocab_size=32256, d_model=2048, n_layers=24, n_heads=16,
                    n_kv_heads=16, d_ff=5504, rope_theta=100000.0, max_seq_len=16384,
                    rope_scaling=RopeScaling(kind="linear", factor=4.0), **llama),
        ModelConfig(name="deepseek-coder-6.7b", vocab_size=32256, d_model=4096, n_layers=32, n_heads=32,
                    n_kv_heads=32, d_ff=11008, rope_theta=100000.0, max_seq_len=16384,
                    rope_scaling=RopeScaling(kind="linear", factor=4.0), **llama),
        ModelConfig(name="codellama-7b", vocab_size=32016, d_model=4096, n_layers=32, n_heads=32,
                    n_kv_heads=32, d_ff=11008, rope_theta=1_000_000.0, max_seq_len=16384, norm_eps=1e-5),
        ModelConfig(name="qwen2.5-coder-0.5b", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                    n_kv_heads=2, d_ff=4864, tie_embeddings=True, **qwen2),
        ModelConfig(name="qwen2.5-coder-1.5b", vocab_size=151936, d_model=1536, n_layers=28, n_heads=12,
                    n_kv_heads=2, d_ff=8960, tie_embeddings=True, **qwen2),
        ModelConfig(name="qwen2.5-coder-7b", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                    n_kv_heads=4, d_ff=18944, **qwen2),
        ModelConfig(name="qwen3-0.6b", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16,
                    n_kv_heads=8, head_dim=128, d_ff=3072, qk_norm=True, tie_embeddings=True,
                    rope_theta=1_000_000.0, max_seq_len=40960),
        ModelConfig(name="qwen3-8b", vocab_size=151936, d_model=4096, n_layers=36, n_heads=32,
                    n_kv_heads=8, head_dim=128, d_ff=12288, qk_norm=True, rope_theta=1_000_000.0,
                    max_seq_len=40960),
        ModelConfig(name="starcoder2-3b", vocab_size=49152, d_model=3072, n_layers=30, n_heads=24,
                    n_kv_heads=2, d_ff=12288, norm="layer", norm_eps=1e-5, mlp="gelu", mlp_bias=True,
                    qkv_bias=True, out_bias=True, rope_theta=999999.4420358813, sliding_window=4096,
                    tie_embeddings=True, max_seq_len=16384),
        ModelConfig(name="mistral-7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                    n_kv_heads=8, d_ff=14336, norm_eps=1e-5, sliding_window=4096, max_seq_len=32768),
        ModelConfig(name="llama-3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                    n_kv_heads=8, d_ff=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    ]
    return {p.name: p for p in presets}


def _small_presets() -> dict[str, ModelConfig]:
    """Models small enough to train on a CPU; `tiny` is the quickstart's model."""
    return {
        "tiny": ModelConfig(name="tiny", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                            d_ff=768, tie_embeddings=True, max_seq_len=1024, rope_theta=10000.0,
                            dtype="float32", remat="none"),
        "small": ModelConfig(name="small", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                             d_ff=1408, tie_embeddings=True, max_seq_len=2048, dtype="float32"),
    }


PRESETS: dict[str, ModelConfig] = {
    **_small_presets(),
    **{name: _grid_preset(name, *shape) for name, shape in _LLAMA_GRID.items()},
    **_real_presets(),
}


# ---- MoE presets -----------------------------------------------------------------------------------


def _moe_presets() -> dict[str, ModelConfig]:
    """Released MoE models (shapes from their Hugging Face config.json) and CPU-sized models of each style.

    Differences from the originals: OLMoE normalises the whole q/k projections (RMSNorm over
    n_heads * head_dim), codelm's `qk_norm` normalises per head; the parameter count differs by
    under 0.001%.
    """
    real = [
        # mistralai/Mixtral-8x7B-v0.1: 8 experts, top-2, weights renormalised over the chosen two.
        ModelConfig(name="mixtral-8x7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    d_ff=14336, norm_eps=1e-5, rope_theta=1_000_000.0, max_seq_len=32768,
                    moe=MoEConfig(num_experts=8, experts_per_token=2, normalize_top_k=True)),
        # deepseek-ai/deepseek-moe-16b-base: 64 fine-grained + 2 shared experts, top-6, first layer dense.
        ModelConfig(name="deepseek-moe-16b", vocab_size=102400, d_model=2048, n_layers=28, n_heads=16,
                    n_kv_heads=16, d_ff=10944, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=4096,
                    moe=MoEConfig(num_experts=64, experts_per_token=6, expert_d_ff=1408, num_shared_experts=2,
                                  first_dense_layers=1, normalize_top_k=False)),
        # Qwen/Qwen3-30B-A3B: 128 experts, top-8, renormalised; every layer MoE.
        ModelConfig(name="qwen3-30b-a3b", vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                    head_dim=128, d_ff=6144, qk_norm=True, norm_eps=1e-6, rope_theta=1_000_000.0,
                    max_seq_len=40960,
                    moe=MoEConfig(num_experts=128, experts_per_token=8, expert_d_ff=768, normalize_top_k=True)),
        # allenai/OLMoE-1B-7B-0924: 64 experts, top-8, not renormalised.
        ModelConfig(name="olmoe-1b-7b", vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
                    d_ff=1024, qk_norm=True, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                    moe=MoEConfig(num_experts=64, experts_per_token=8, normalize_top_k=False)),
    ]
    # Tiny versions: the `tiny` dense model's trunk with each style's routing, small enough for a CPU.
    tiny = PRESETS["tiny"]
    styles = {
        "mixtral-tiny": (tiny.d_ff, MoEConfig(num_experts=8, experts_per_token=2, expert_d_ff=512)),
        "deepseek-moe-tiny": (tiny.d_ff, MoEConfig(num_experts=64, experts_per_token=6, expert_d_ff=64,
                                                   num_shared_experts=2, first_dense_layers=1,
                                                   normalize_top_k=False)),
        "qwen3-moe-tiny": (tiny.d_ff, MoEConfig(num_experts=128, experts_per_token=8, expert_d_ff=64)),
        "olmoe-tiny": (tiny.d_ff, MoEConfig(num_experts=64, experts_per_token=8, expert_d_ff=64,
                                            normalize_top_k=False)),
    }
    small = [tiny.replace(name=name, d_ff=d_ff, moe=moe, qk_norm=name in ("qwen3-moe-tiny", "olmoe-tiny"))
             for name, (d_ff, moe) in styles.items()]
    return {p.name: p for p in real + small}


PRESETS.update(_moe_presets())


def _mla_presets() -> dict[str, ModelConfig]:
    """Released DeepSeek MLA-MoE models (shapes from their Hugging Face config.json), Qwen3-Coder's MoE,
    and CPU-sized models of the two DeepSeek routing styles.

    The DeepSeek models extend their 4K pretraining context 40x with YaRN, DeepSeek's way: cos/sin
    unscaled (mscale = mscale_all_dim) and scores scaled by (0.1 * mscale_all_dim * ln 40 + 1)^2.
    DeepSeek-V3's multi-token-prediction module (14B more parameters) is not part of the model.
    """

    def deepseek_yarn(mscale: float) -> dict[str, Any]:
        rope = RopeScaling(kind="yarn", factor=40.0, original_max_position=4096, attention_factor=1.0)
        return dict(rope_theta=10000.0, rope_scaling=rope, max_seq_len=163840,
                    score_scale=(0.1 * mscale * math.log(40.0) + 1.0) ** 2)

    lite_yarn, v3_yarn = deepseek_yarn(0.707), deepseek_yarn(1.0)
    lite_mla = MLAConfig(q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                         score_scale=lite_yarn.pop("score_scale"))
    real = [
        # deepseek-ai/DeepSeek-Coder-V2-Lite-Base: MLA without a query bottleneck, 64 experts + 2 shared, top-6
        # by softmax, not renormalised; the first layer dense.
        ModelConfig(name="deepseek-coder-v2-lite", vocab_size=102400, d_model=2048, n_layers=27, n_heads=16,
                    n_kv_heads=16, head_dim=64, d_ff=10944, norm_eps=1e-6, mla=lite_mla, **lite_yarn,
                    moe=MoEConfig(num_experts=64, experts_per_token=6, expert_d_ff=1408, num_shared_experts=2,
                                  first_dense_layers=1, normalize_top_k=False)),
        # deepseek-ai/DeepSeek-V3-Base: MLA with a 1536 query bottleneck; 256 experts + 1 shared, top-8 by sigmoid
        # within the best 4 of 8 groups, renormalised, x2.5; auxiliary-loss-free balancing at rate 0.001
        # (DeepSeek-V3 report, sec. 4.2); the first 3 layers dense.
        ModelConfig(name="deepseek-v3", vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=128,
                    head_dim=64, d_ff=18432, norm_eps=1e-6,
                    mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                  v_head_dim=128, score_scale=v3_yarn.pop("score_scale")), **v3_yarn,
                    moe=MoEConfig(num_experts=256, experts_per_token=8, expert_d_ff=2048, num_shared_experts=1,
                                  first_dense_layers=3, router="sigmoid", routed_scaling=2.5, num_groups=8,
                                  topk_groups=4, bias_update_rate=0.001)),
        # Qwen/Qwen3-Coder-30B-A3B-Instruct: Qwen3-30B-A3B's shapes, RoPE base 1e7, 256K context.
        PRESETS["qwen3-30b-a3b"].replace(name="qwen3-coder-30b-a3b", rope_theta=10_000_000.0, max_seq_len=262144),
    ]
    # The `tiny` trunk with MLA (latent 64, RoPE key 32) and each DeepSeek routing style.
    tiny = PRESETS["tiny"].replace(n_kv_heads=PRESETS["tiny"].n_heads)
    small_mla = MLAConfig(q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64)
    small = [
        tiny.replace(name="deepseek-v2-lite-tiny", mla=small_mla,
                     moe=MoEConfig(num_experts=64, experts_per_token=6, expert_d_ff=64, num_shared_experts=2,
                                   first_dense_layers=1, normalize_top_k=False)),
        tiny.replace(name="deepseek-v3-tiny", mla=dataclasses.replace(small_mla, q_lora_rank=96),
                     moe=MoEConfig(num_experts=32, experts_per_token=4, expert_d_ff=96, num_shared_experts=1,
                                   first_dense_layers=1, router="sigmoid", routed_scaling=2.5, num_groups=4,
                                   topk_groups=2, bias_update_rate=0.001)),
    ]
    return {p.name: p for p in real + small}


PRESETS.update(_mla_presets())


def _gemma_presets() -> dict[str, ModelConfig]:
    """CodeGemma-7B (google/codegemma-7b, the Gemma 7B architecture: GeGLU MLP, scaled and tied
    embeddings, multi-head attention with 256-wide heads) and a CPU-sized Gemma 2: the `tiny` trunk
    with Gemma 2's sliding and global layers alternating, post-norms and soft-capped attention scores
    and logits (Gemma 2 2B/9B's 50 and 30, queries scaled by 1 / sqrt(head_dim))."""
    gemma = dict(mlp="geglu", scale_embeddings=True, norm_scale_offset=1.0, tie_embeddings=True, norm_eps=1e-6)
    codegemma = ModelConfig(name="codegemma-7b", vocab_size=256000, d_model=3072, n_layers=28, n_heads=16, n_kv_heads=16,
                            head_dim=256, d_ff=24576, rope_theta=10000.0, max_seq_len=8192, **gemma)
    tiny = PRESETS["tiny"]
    gemma2_tiny = tiny.replace(name="gemma2-tiny", sliding_window=128, global_every=2, post_norms=True,
                               query_pre_attn_scalar=tiny.head_dim, attn_logit_softcap=50.0, logit_softcap=30.0, **gemma)
    return {p.name: p for p in (codegemma, gemma2_tiny)}


PRESETS.update(_gemma_presets())


def _gpt_oss_presets() -> dict[str, ModelConfig]:
    """openai/gpt-oss-20b (its Hugging Face config.json: 32 experts, top-4, on all 24 layers; sliding
    (128) and full layers alternating, the first sliding; YaRN x32 over a 4K pretraining context,
    unrounded ramp) and the `tiny` trunk with gpt-oss's layers (8 experts, top-2, window 128)."""
    gpt_oss = dict(mlp="clamped_swiglu", qkv_bias=True, out_bias=True, attention_sinks=True,
                   sliding_window=128, global_every=2, rope_theta=150000.0, norm_eps=1e-5)
    yarn = RopeScaling(kind="yarn", factor=32.0, original_max_position=4096, truncate=False)
    real = ModelConfig(name="gpt-oss-20b", vocab_size=201088, d_model=2880, n_layers=24, n_heads=64, n_kv_heads=8,
                       head_dim=64, d_ff=2880, rope_scaling=yarn, max_seq_len=131072, **gpt_oss,
                       moe=MoEConfig(num_experts=32, experts_per_token=4, router_bias=True, expert_bias=True))
    tiny = PRESETS["tiny"].replace(name="gpt-oss-tiny", d_ff=256, tie_embeddings=False, **gpt_oss,
                                   moe=MoEConfig(num_experts=8, experts_per_token=2, router_bias=True, expert_bias=True))
    return {p.name: p for p in (real, tiny)}


PRESETS.update(_gpt_oss_presets())


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns the named preset, with `overrides` applied (validated)."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


_NESTED = {"rope_scaling": RopeScaling, "moe": MoEConfig, "lora": LoRAConfig, "mla": MLAConfig}


def _set_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """Drops unset (None) entries; a config file may list every field as an unset placeholder."""
    return {k: v for k, v in values.items() if v is not None}


def config_from_dict(values: Mapping[str, Any], field_prefix: str = "model", base: ModelConfig | None = None) -> ModelConfig:
    """Builds a ModelConfig from a mapping (e.g. an ml_collections ConfigDict section).

    `preset` (optional) names the base; the other keys override its fields, and the nested
    `rope_scaling` / `moe` mappings override the preset's nested fields one by one (a preset
    without MoE gets `MoEConfig` defaults for the rest). None means "keep the preset's value", so
    `configs/base.py` can list every field for command-line overrides. Unknown keys are errors that
    name the field. `base` (instead of a preset): the config of a checkpoint being fine-tuned.
    """
    values = _set_fields(values)
    preset = values.pop("preset", None)
    if base is None:
        try:
            base = get_preset(preset) if preset else ModelConfig()
        except ConfigError as e:
            raise ConfigError(f"{field_prefix}.{e}") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in values:
        if key not in known:
            raise unknown_field(field_prefix, key, known | {"preset"})
    for key, cls in _NESTED.items():
        if key not in values or isinstance(values[key], cls):
            continue
        nested = _set_fields(values.pop(key))
        names = {f.name for f in dataclasses.fields(cls)}
        for name in nested:
            if name not in names:
                raise unknown_field(f"{field_prefix}.{key}", name, names)
        if nested:
            values[key] = dataclasses.replace(getattr(base, key) or cls(), **nested)
    try:
        return base.replace(**values) if values else base
    except ConfigError as e:
        raise ConfigError(f"{field_prefix}.{e}") from None
