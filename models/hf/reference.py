"""Tiny random `transformers` models: the reference implementations codelm's import is checked against.

Needs torch and transformers (test/benchmark dependencies, not runtime ones). Weights are drawn
larger than transformers' init (std 0.02 would make every logit ~0 and hide layout mistakes):
matrices and biases N(0, 0.3), norm scales 1 + N(0, 0.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers

TINY_SHAPE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# Per family, options that exercise what is particular to it at the tiny size.
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 32},  # Qwen3 decouples head_dim from hidden_size / heads
    "mistral": {"sliding_window": 4},
    "starcoder2": {"sliding_window": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": True},
    # MLA (one key/value head per query head, q_lora_rank set) and 8 experts in 4 groups, a dense layer first.
    "deepseek_v2": {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 16,
                    "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 3,
                    "moe_intermediate_size": 32, "n_shared_experts": 2, "first_k_dense_replace": 1, "num_hidden_layers": 3,
                    "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5},
    "deepseek_v3": {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 16,
                    "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 3,
                    "moe_intermediate_size": 32, "n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3,
                    "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True},
}


def tiny_config(model_type: str, **options: Any) -> transformers.PretrainedConfig:
    kwargs = {**TINY_SHAPE, **FAMILY_OPTIONS.get(model_type, {}), **options}
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def random_model(model_type: str, seed: int = 0, **options: Any) -> transformers.PreTrainedModel:
    """A float32 causal LM of `model_type` with random weights (see the module docstring)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **options), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3)
    return model.eval()


def logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """Float32 logits [B, T, V] of `tokens` [B, T] (every token real, positions 0..T-1)."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
