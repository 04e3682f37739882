"""Logical-to-mesh axis rules (MaxText style): model code names axes, these rules place them.

Each rule maps one logical axis name to a mesh axis, a tuple of mesh axes, or None (replicated).
A dimension takes the first rule for its name; mesh axes already used by another dimension of the
same array are skipped, so one table serves parameters and activations.

Mesh axes, outermost first: data (pure data parallelism), fsdp (data parallelism with parameters,
gradients and optimizer state sharded), expert (MoE experts; batch elsewhere), sequence (context
parallelism: every activation split along T, attention all-gathering keys and values per shard in
models/attention/parallel.py), tensor (Megatron-style model parallelism, innermost so it rides the
fastest links).
"""

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# Parameters: weights shard over fsdp on the model dimension and over tensor on heads / mlp / vocab.
# Activations: batch over every data-parallel axis, heads / mlp / vocab over tensor.
DEFAULT_RULES = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_experts", "expert"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # MLA latents (models/mla.py), as MaxText places them: a down-projection's latent output is whole
    # (small, and every head reads all of it), an up-projection's latent input is sharded like "embed".
    ("q_lora_up_proj", None),
    ("kv_lora_up_proj", None),
    ("q_lora", "fsdp"),
    ("kv_lora", "fsdp"),
    # The multi-token-prediction projection's [2 * d_model] input (models/mtp.py); its output is "embed".
    ("concat_embed", None),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)

# Pure data parallelism: every parameter replicated.
DATA_PARALLEL_RULES = tuple((name, None) for name, _ in DEFAULT_RULES if name != "batch") + (
    ("batch", ("data", "fsdp", "expert")),
)

RULE_SETS = {"default": DEFAULT_RULES, "data_parallel": DATA_PARALLEL_RULES}
