"""What a Hugging Face model family is to codelm: a config translation and a tensor-name map.

A `Family` turns a `config.json` into a `ModelConfig` and back, and lists, for one decoder block,
which HF tensor holds which codelm parameter (`TensorMap`). The base class describes the Llama
layout that every supported family shares (attention, norms, SwiGLU MLP); subclasses override only
what differs. Reading a field that the file lacks falls back to the family's `defaults`, the
defaults of the matching `transformers` config class (tests check them against it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from models.config import LAYER_TYPES, ConfigError, ModelConfig, RopeScaling
from models.hf.layouts import HeadsBias, HeadsIn, HeadsOut, Layout, Same, Transposed

# The ModelConfig fields only the Gemma families (models/hf/gemma.py) set, at their "off" values.
GEMMA_FIELDS_OFF: Mapping[str, Any] = {"query_pre_attn_scalar": 0, "attn_logit_softcap": 0.0, "scale_embeddings": False,
                                       "post_norms": False, "norm_scale_offset": 0.0, "sliding_rope_theta": 0.0}

# Every block lives under this prefix; global tensors are listed in `Family.global_tensors`.
LAYER_PREFIX = "model.layers.{layer}."


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One codelm parameter and the HF tensor(s) holding it.

    codelm: parameter path inside a `Block` (e.g. ("attn", "q_proj")), or inside the `Decoder` for
      global tensors.
    hf: HF tensor name, relative to `model.layers.{layer}.` for block tensors; "{expert}" is
      replaced by the expert number when `per_expert`.
    per_expert: the codelm tensor has a leading experts axis, one HF tensor per expert.
    """

    codelm: tuple[str, ...]
    hf: str
    layout: Layout
    per_expert: bool = False


class HFConfig:
    """Fields of a `config.json`, with family defaults, and errors that name the file and field."""

    def __init__(self, values: Mapping[str, Any], source: str, defaults: Mapping[str, Any]):
        self.values, self.source, self.defaults = dict(values), source, defaults

    def get(self, key: str) -> Any:
        """The file's value (null included), else the family default; a missing required field is an error."""
        if key in self.values:
            return self.values[key]
        if key in self.defaults:
            return self.defaults[key]
        raise ConfigError(f"{self.source}: missing field {key!r}")

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: field {key!r} = {self.get(key)!r}: {message}")

    def expect(self, key: str, allowed: tuple[Any, ...]) -> Any:
        value = self.get(key)
        if value not in allowed:
            raise self.error(key, f"codelm supports {', '.join(map(repr, allowed))}")
        return value


# ---- RoPE --------------------------------------------------------------------------------------------


def rope_spec(hf: HFConfig) -> dict[str, Any]:
    """The RoPE scaling entries of a config.json, legacy `rope_scaling` first (as in transformers)."""
    return dict(hf.values.get("rope_scaling") or hf.values.get("rope_parameters") or {})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1), as DeepSeek writes it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def read_rope(hf: HFConfig, yarn_attention_factor: bool = False) -> dict[str, Any]:
    """rope_theta and rope_scaling from either the legacy (`rope_theta` + `rope_scaling`) or the
    transformers 5 (`rope_parameters`) spelling; the legacy one wins, as in transformers.
    yarn_attention_factor: accept YaRN's `attention_factor` / `mscale` / `mscale_all_dim` (read into
    `RopeScaling.attention_factor` as transformers computes it), for families whose attention uses it."""
    params = hf.values.get("rope_parameters") or {}
    spec = rope_spec(hf)
    if any(isinstance(v, Mapping) for v in spec.values()):
        raise ConfigError(f"{hf.source}: per-layer-type RoPE parameters are not supported")
    theta = hf.values.get("rope_theta") or params.get("rope_theta") or hf.defaults["rope_theta"]
    kind = spec.get("rope_type", spec.get("type", "default"))
    field = "rope_scaling" if hf.values.get("rope_scaling") else "rope_parameters"

    def option(name: str, default: Any) -> Any:
        value = spec.get(name)
        return default if value is None else value

    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{hf.source}: {field}.partial_rotary_factor: partial rotary embeddings are not supported")
    if kind == "default":
        scaling = RopeScaling()
    elif kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(spec["factor"]))
    elif kind == "llama3":
        scaling = RopeScaling(
            kind="llama3",
            factor=float(spec["factor"]),
            original_max_position=int(option("original_max_position_embeddings", hf.get("max_position_embeddings"))),
            low_freq_factor=float(option("low_freq_factor", 1.0)),
            high_freq_factor=float(option("high_freq_factor", 4.0)),
        )
    elif kind == "yarn":
        for unsupported in ("attention_factor", "mscale", "mscale_all_dim"):
            if spec.get(unsupported) is not None and not yarn_attention_factor:
                raise ConfigError(f"{hf.source}: {field}.{unsupported}: only YaRN's default attention factor is supported")
        if spec.get("truncate", True) is not True:
            raise ConfigError(f"{hf.source}: {field}.truncate: only truncate=true is supported")
        factor = float(spec["factor"])
        attention_factor = spec.get("attention_factor")
        if attention_factor is None and spec.get("mscale") and spec.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, spec["mscale"]) / yarn_mscale(factor, spec["mscale_all_dim"])
        scaling = RopeScaling(
            kind="yarn",
            factor=factor,
            original_max_position=int(option("original_max_position_embeddings", hf.get("max_position_embeddings"))),
            beta_fast=float(option("beta_fast", 32.0)),
            beta_slow=float(option("beta_slow", 1.0)),
            attention_factor=float(attention_factor or 0.0),
        )
    else:
        raise ConfigError(f"{hf.source}: {field}.rope_type = {kind!r}: codelm supports default, linear, llama3, yarn")
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def write_rope(cfg: ModelConfig) -> dict[str, Any]:
    """Both spellings, consistent: legacy keys for older readers, `rope_parameters` for transformers 5."""
    s = cfg.rope_scaling
    if s.kind == "none":
        scaling = None
    elif s.kind == "linear":
        scaling = {"rope_type": "linear", "factor": s.factor}
    elif s.kind == "llama3":
        scaling = {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position,
        }
    else:
        scaling = {
            "rope_type": "yarn", "factor": s.factor, "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
            "original_max_position_embeddings": s.original_max_position,
        }
    parameters = {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": parameters}


# ---- families ----------------------------------------------------------------------------------------


class Family:
    """The Llama layout; subclasses change what their family does differently."""

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    defaults: ClassVar[Mapping[str, Any]] = {}
    activations: ClassVar[tuple[str, ...]] = ("silu",)
    norm_eps_key: ClassVar[str] = "rms_norm_eps"
    yarn_attention_factor: ClassVar[bool] = False  # see `read_rope`
    # ModelConfig fields this family cannot change (checked before export).
    fixed: ClassVar[Mapping[str, Any]] = {"norm": "rms", "mlp": "swiglu", "qk_norm": False, "logit_softcap": 0.0,
                                          "layer_types": (), "global_every": 0, "mla": None,
                                          **GEMMA_FIELDS_OFF}
    # Families whose config.json has per-layer `layer_types` leave these two out of `fixed`.
    SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = ("layer_types", "global_every")

    # -- config.json -> ModelConfig

    def config_fields(self, hf: HFConfig) -> dict[str, Any]:
        """ModelConfig fields for a config.json of this family."""
        hf.expect("hidden_act", self.activations)
        d_model, n_heads = hf.get("hidden_size"), hf.get("num_attention_heads")
        fields = dict(
            vocab_size=hf.get("vocab_size"),
            d_model=d_model,
            n_layers=hf.get("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or d_model // n_heads,
            d_ff=hf.get("intermediate_size"),
            norm_eps=float(hf.get(self.norm_eps_key)),
            max_seq_len=hf.get("max_position_embeddings"),
            tie_embeddings=bool(hf.get("tie_word_embeddings")),
            **read_rope(hf, self.yarn_attention_factor),
        )
        fields.update(self.family_fields(hf))
        return fields

    def family_fields(self, hf: HFConfig) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias"))
        return dict(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias")))

    # -- ModelConfig -> config.json

    def check_exportable(self, cfg: ModelConfig) -> None:
        """Raises ConfigError naming the first ModelConfig field this family cannot express."""
        for field, value in self.fixed.items():
            if getattr(cfg, field) != value:
                raise ConfigError(f"{field}={getattr(cfg, field)!r} cannot be expressed as {self.model_type} (needs {value!r})")
        self.check_moe(cfg)

    def check_moe(self, cfg: ModelConfig) -> None:
        if cfg.moe is not None:
            raise ConfigError(f"moe: {self.model_type} is a dense family")

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        self.check_exportable(cfg)
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_ff,
            "hidden_act": self.activations[0],
            self.norm_eps_key: cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings,
            **write_rope(cfg),
            **self.family_config(cfg),
        }

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.qkv_bias != cfg.out_bias:
            raise ConfigError(f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}: {self.model_type} has one attention_bias")
        if any(map(cfg.layer_window, range(cfg.n_layers))):
            raise ConfigError(f"sliding_window={cfg.sliding_window}: {self.model_type} has no sliding-window attention")
        return {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}

    # -- tensors

    def global_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        """Tensors outside the blocks; codelm paths are relative to the Decoder."""
        tensors = [TensorMap(("embed",), "model.embed_tokens.weight", Same()),
                   TensorMap(("final_norm", "scale"), "model.norm.weight", Same())]
        if cfg.norm == "layer":
            tensors.append(TensorMap(("final_norm", "bias"), "model.norm.bias", Same()))
        if not cfg.tie_embeddings:
            tensors.append(TensorMap(("lm_head",), "lm_head.weight", Transposed()))
        return tensors

    def block_tensors(self, cfg: ModelConfig, moe: bool) -> list[TensorMap]:
        """Tensors of one block; HF names relative to `model.layers.{layer}.`."""
        ffn = self.moe_tensors(cfg) if moe else self.mlp_tensors(cfg)
        return self.attention_tensors(cfg) + self.norm_tensors(cfg) + ffn

    def attention_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        heads = {"q": n, "k": k, "v": k}
        tensors = [TensorMap(("attn", f"{p}_proj"), f"self_attn.{p}_proj.weight", HeadsIn(heads[p], h)) for p in heads]
        tensors.append(TensorMap(("attn", "o_proj"), "self_attn.o_proj.weight", HeadsOut(n, h)))
        if cfg.qkv_bias:
            tensors += [TensorMap(("attn", f"{p}_bias"), f"self_attn.{p}_proj.bias", HeadsBias(heads[p], h)) for p in heads]
        if cfg.out_bias:
            tensors.append(TensorMap(("attn", "o_bias"), "self_attn.o_proj.bias", Same()))
        if cfg.qk_norm:
            tensors += [TensorMap(("attn", f"{p}_norm", "scale"), f"self_attn.{p}_norm.weight", Same()) for p in "qk"]
        return tensors

    def norm_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        params = {"scale": "weight", "bias": "bias"} if cfg.norm == "layer" else {"scale": "weight"}
        return [
            TensorMap((codelm_norm, codelm_param), f"{hf_norm}.{hf_param}", Same())
            for codelm_norm, hf_norm in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"))
            for codelm_param, hf_param in params.items()
        ]

    def mlp_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        tensors = [TensorMap(("ffn", "mlp", f"{p}_proj"), f"mlp.{p}_proj.weight", Transposed()) for p in ("gate", "up", "down")]
        if cfg.mlp_bias:
            tensors += [TensorMap(("ffn", "mlp", f"{p}_bias"), f"mlp.{p}_proj.bias", Same()) for p in ("gate", "up", "down")]
        return tensors

    def moe_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        raise ConfigError(f"{self.model_type} has no mixture-of-experts layers")

    def ignores(self, name: str, cfg: ModelConfig) -> bool:
        """Whether checkpoint tensor `name` carries no parameter: an LM head duplicating tied
        embeddings, or RoPE frequencies some older checkpoints saved."""
        return name.endswith(".rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def layer_schedule_fields(window: int | None, layer_types: list[str], source: str) -> dict[str, Any]:
    """ModelConfig `sliding_window` and `layer_types` for per-layer types as transformers writes
    them: a "sliding_attention" layer has `window` (None: no window, as transformers reads it), a
    "full_attention" layer none; uniform layers need no `layer_types`."""
    for kind in layer_types:
        if kind not in LAYER_TYPES:
            raise ConfigError(f"{source}: field 'layer_types': {kind!r}; codelm supports {', '.join(LAYER_TYPES)}")
    kinds = {kind if window else "full_attention" for kind in layer_types}
    if kinds == {"full_attention"}:
        return {"sliding_window": 0, "layer_types": ()}
    if kinds == {"sliding_attention"}:
        return {"sliding_window": window, "layer_types": ()}
    return {"sliding_window": window, "layer_types": tuple(layer_types)}


def write_layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.n_layers)]


def qwen_sliding_window(hf: HFConfig) -> dict[str, Any]:
    """`sliding_window` and `layer_types` of a Qwen2/Qwen3 config (`use_sliding_window`, `layer_types`,
    else `max_window_layers`: layers from that index on slide), as transformers applies them."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    n_layers = hf.get("num_hidden_layers")
    layer_types = hf.values.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers") else "full_attention"
        for i in range(n_layers)
    ]
    if len(layer_types) != n_layers:
        raise hf.error("layer_types", f"needs one entry per layer ({n_layers})")
    return layer_schedule_fields(window, list(layer_types), hf.source)


def qwen_sliding_window_config(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen2/Qwen3 window fields: explicit `layer_types`, and `max_window_layers` at the first sliding
    layer for readers that predate `layer_types` (exact when the sliding layers are a suffix)."""
    layer_types = write_layer_types(cfg)
    sliding = "sliding_attention" in layer_types
    return {
        "use_sliding_window": sliding,
        "sliding_window": cfg.sliding_window if sliding else None,
        "max_window_layers": layer_types.index("sliding_attention") if sliding else cfg.n_layers,
        "layer_types": layer_types,
    }


class MoEFamily(Family):
    """A family whose blocks have a softmax top-k router (`mlp.gate` / `block_sparse_moe.gate`, [E, D])
    and bias-free SwiGLU experts stored one tensor per expert, as on the Hugging Face Hub."""

    moe_prefix: ClassVar[str]  # HF module of the MoE layer inside a block
    expert_projections: ClassVar[Mapping[str, str]]  # codelm expert weight -> HF name in one expert
    # MoEConfig fields these families cannot change. bias_update_rate: HF has no selection bias, and
    # it stays zero (its initial value, which import gives it) only when never updated.
    fixed_moe: ClassVar[Mapping[str, Any]] = {"router": "softmax", "num_shared_experts": 0, "routed_scaling": 1.0,
                                              "bias_update_rate": 0.0, "num_groups": 1, "topk_groups": 1}

    def check_moe(self, cfg: ModelConfig) -> None:
        if cfg.moe is None:
            raise ConfigError(f"moe: {self.model_type} is a mixture-of-experts family; the config has no moe")
        for field, value in self.fixed_moe.items():
            if getattr(cfg.moe, field) != value:
                raise ConfigError(f"moe.{field}={getattr(cfg.moe, field)!r} cannot be expressed as {self.model_type} (needs {value!r})")

    def moe_tensors(self, cfg: ModelConfig) -> list[TensorMap]:
        experts = [
            TensorMap(("ffn", "experts", codelm), f"{self.moe_prefix}.experts.{{expert}}.{hf}.weight", Transposed(), per_expert=True)
            for codelm, hf in self.expert_projections.items()
        ]
        return [TensorMap(("ffn", "router", "kernel"), f"{self.moe_prefix}.gate.weight", Transposed()), *experts]
