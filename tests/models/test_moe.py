"""The MoE layer against a naive per-token reference: routing, both execution paths, both grouped-matmul
kernels, capacity drops, the balancing losses and their gradients, the bias update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ConfigError, MoEConfig, get_preset
from models.moe import (
    GROUPED_MATMUL_KERNELS,
    MoEFeedForward,
    apply_bias_updates,
    capacity_slots,
    expert_capacity,
    grouped_matmul_kernel,
)

N_TOKENS = (2, 6)  # B, T


def moe_config(mlp: str = "swiglu", **moe):
    moe = {"num_experts": 8, "experts_per_token": 2, "expert_d_ff": 12, **moe}
    return get_preset("tiny", d_model=16, n_heads=2, n_kv_heads=2, d_ff=24, n_layers=2, vocab_size=64, mlp=mlp,
                      moe=MoEConfig(**moe))


def make_layer(cfg, seed=0, bias=None):
    layer = MoEFeedForward(cfg, rngs=nnx.Rngs(seed))
    if bias is not None:
        layer.router.bias.set_value(jnp.asarray(bias, jnp.float32))
    return layer


def inputs(cfg, seed=1):
    return jax.random.normal(jax.random.key(seed), (*N_TOKENS, cfg.d_model), jnp.float32)


# ---- the naive reference: one token and one chosen expert at a time ----------------------------------


def reference_params(state) -> dict:
    """The layer's parameters (or their gradients), as the reference names them."""
    tree = nnx.to_pure_dict(state)
    p = {"router": tree["router"]["kernel"], **tree["experts"]}
    if "shared_experts" in tree:
        p["shared"] = {name.removesuffix("_proj"): w for name, w in tree["shared_experts"].items()}
    return p


def reference_scores(p, x, moe: MoEConfig):
    logits = x @ p["router"]
    return jax.nn.softmax(logits) if moe.router == "softmax" else jax.nn.sigmoid(logits)


def reference_choices(p, x, moe: MoEConfig, bias) -> np.ndarray:
    """[N, K] experts chosen by numpy: the K largest scores + bias, best first."""
    scores = np.asarray(reference_scores(p, x, moe), np.float64) + np.asarray(bias, np.float64)
    return np.argsort(-scores, axis=-1, kind="stable")[:, : moe.experts_per_token]


def reference_mlp(w: dict, e, h):
    index = (lambda a: a[e]) if e is not None else (lambda a: a)
    up = h @ index(w["up"])
    hidden = jax.nn.silu(h @ index(w["gate"])) * up if "gate" in w else jax.nn.gelu(up, approximate=True)
    return hidden @ index(w["down"])


def reference_moe(p, x, moe: MoEConfig, choices: np.ndarray, kept: np.ndarray | None = None):
    """y [N, D] plus the two scaled balancing losses, by the definitions (tokens one at a time)."""
    scores = reference_scores(p, x, moe)
    outputs = []
    for n in range(x.shape[0]):
        chosen = scores[n, choices[n]]
        weights = chosen / chosen.sum() if moe.normalize_top_k else chosen
        y = jnp.zeros(x.shape[-1])
        for j, e in enumerate(choices[n]):
            if kept is None or kept[n, j]:
                y = y + moe.routed_scaling * weights[j] * reference_mlp(p, int(e), x[n])
        if "shared" in p:
            y = y + reference_mlp(p["shared"], None, x[n])
        outputs.append(y)
    counts = np.bincount(choices.reshape(-1), minlength=moe.num_experts) / choices.size
    probs = scores / scores.sum(-1, keepdims=True)
    load_balancing = moe.aux_loss_coef * moe.num_experts * jnp.sum(counts * probs.mean(0))
    z_loss = moe.router_z_loss_coef * jnp.mean(jax.nn.logsumexp(x @ p["router"], axis=-1) ** 2)
    return jnp.stack(outputs), load_balancing, z_loss


def reference_capacity_kept(choices: np.ndarray, capacity: int) -> np.ndarray:
    """Which assignments get a slot: first choices of all tokens in token order, then second choices..."""
    used = np.zeros(choices.max() + 1, int)
    kept = np.zeros(choices.shape, bool)
    for rank in range(choices.shape[1]):
        for n in range(choices.shape[0]):
            e = choices[n, rank]
            kept[n, rank] = used[e] < capacity
            used[e] += 1
    return kept


# ---- tests ---------------------------------------------------------------------------------------------

ROUTINGS = {
    "mixtral": {"router": "softmax", "normalize_top_k": True},
    "olmoe": {"router": "softmax", "normalize_top_k": False, "experts_per_token": 4},
    "deepseek_v3": {"router": "sigmoid", "normalize_top_k": True, "routed_scaling": 2.5, "num_shared_experts": 2},
}


def check_against_reference(cfg, kept_fn=None, bias=None, seed=0):
    """Forward, aux and gradients (of sum(y * cotangent) + losses) of the layer vs the reference."""
    moe = cfg.moe
    bias = np.zeros(moe.num_experts) if bias is None else bias
    layer = make_layer(cfg, seed, bias)
    x = inputs(cfg, seed + 1)
    flat_x = x.reshape(-1, cfg.d_model)
    p = reference_params(nnx.state(layer, nnx.Param))
    choices = reference_choices(p, flat_x, moe, bias)
    kept = None if kept_fn is None else kept_fn(choices)
    cotangent = jax.random.normal(jax.random.key(seed + 2), x.shape)

    def reference_loss(p, flat_x):
        y, lb, z = reference_moe(p, flat_x, moe, choices, kept)
        return jnp.sum(y * cotangent.reshape(y.shape)) + lb + z, (y, lb, z)

    (_, (y_ref, lb_ref, z_ref)), (grad_p_ref, grad_x_ref) = jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True)(p, flat_x)

    def loss(layer, x):
        y, aux = layer(x)
        return jnp.sum(y * cotangent) + aux["loss_load_balancing"] + aux["loss_router_z"], (y, aux)

    (_, (y, aux)), (grads, grad_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
    np.testing.assert_allclose(y.reshape(y_ref.shape), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["loss_load_balancing"], lb_ref, rtol=1e-5)
    np.testing.assert_allclose(aux["loss_router_z"], z_ref, rtol=1e-5)
    load = np.bincount(choices.reshape(-1), minlength=moe.num_experts) / choices.size
    np.testing.assert_allclose(aux["expert_load"], load, rtol=1e-6)
    np.testing.assert_allclose(aux["load_max_mean_ratio"], load.max() * moe.num_experts, rtol=1e-6)
    expected_dropped = 0.0 if kept is None else 1 - kept.mean()
    np.testing.assert_allclose(aux["dropped_fraction"], expected_dropped, atol=1e-7)

    grad_p = reference_params(grads)
    assert jax.tree.structure(grad_p) == jax.tree.structure(grad_p_ref)
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(grad_p_ref), jax.tree.leaves(grad_p)):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(grad_x.reshape(grad_x_ref.shape), grad_x_ref, rtol=2e-4, atol=2e-6)
    return aux


@pytest.mark.parametrize(("routing", "kernel"), [("mixtral", "ragged_dot"), ("olmoe", "tiled"), ("deepseek_v3", "tiled")])
def test_dropless_matches_per_token_reference(routing, kernel):
    check_against_reference(moe_config(impl="dropless", grouped_matmul=kernel, **ROUTINGS[routing]))


def test_dropless_gelu_experts_and_selection_bias():
    # A bias that favours experts 6 and 7 changes which experts are chosen but not the weights' values.
    bias = np.array([0, 0, 0, 0, 0, 0, 0.3, 0.3])
    aux = check_against_reference(moe_config("gelu", router="sigmoid", bias_update_rate=0.01), bias=bias)
    assert aux["expert_load"][6] + aux["expert_load"][7] > 0.5


def test_capacity_equals_reference_when_nothing_is_dropped():
    cfg = moe_config(impl="capacity", capacity_factor=4.0, **ROUTINGS["deepseek_v3"])
    aux = check_against_reference(cfg)
    assert float(aux["dropped_fraction"]) == 0.0


def test_capacity_drops_exactly_the_assignments_beyond_capacity():
    """Capacity is per sequence: each of the B sequences queues at every expert on its own."""
    capacity_factor = 0.7
    cfg = moe_config(impl="capacity", capacity_factor=capacity_factor, **ROUTINGS["mixtral"])
    batch, length = N_TOKENS
    capacity = expert_capacity(length, cfg.moe)
    assert capacity == int(np.ceil(capacity_factor * length * 2 / 8))

    def kept(choices):
        per_sequence = choices.reshape(batch, length, -1)
        return np.concatenate([reference_capacity_kept(c, capacity) for c in per_sequence]).reshape(choices.shape)

    aux = check_against_reference(cfg, kept_fn=kept)
    assert float(aux["dropped_fraction"]) > 0


def test_capacity_does_not_depend_on_the_mesh():
    """The same tokens are dropped, and the same output computed, on one device and on an
    8-device mesh with the batch split over fsdp and the experts over the expert axis."""
    from configs.sharding_rules import DEFAULT_RULES
    from models.sharding import make_mesh, sharding_context

    cfg = dataclasses.replace(moe_config(impl="capacity", capacity_factor=0.5, **ROUTINGS["mixtral"]))
    layer = make_layer(cfg)
    x = jax.random.normal(jax.random.key(3), (8, 16, cfg.d_model))
    y_one, aux_one = jax.jit(lambda x: layer(x))(x)
    with sharding_context(make_mesh({"fsdp": 2, "expert": 4}), DEFAULT_RULES):
        y_mesh, aux_mesh = jax.jit(lambda x: layer(x))(x)
    assert float(aux_one["dropped_fraction"]) > 0.1
    assert float(aux_mesh["dropped_fraction"]) == float(aux_one["dropped_fraction"])
    np.testing.assert_allclose(y_mesh, y_one, rtol=1e-5, atol=1e-6)


def test_capacity_slots_serve_first_choices_first():
    ids = jnp.array([[0, 1], [1, 0], [0, 2]])
    # Rank 0: token0->e0 (slot 0), token1->e1 (0), token2->e0 (1); rank 1: token0->e1 (1), token1->e0 (2), token2->e2 (0).
    np.testing.assert_array_equal(capacity_slots(ids, 3), [[0, 1], [0, 2], [1, 0]])


@pytest.mark.parametrize("kernel", sorted(GROUPED_MATMUL_KERNELS))
def test_grouped_matmul_kernels_match_per_group_dense_products(kernel):
    rng = np.random.default_rng(0)
    sizes = np.array([5, 0, 17, 1, 0, 9])  # empty groups, and 8 trailing rows outside every group
    lhs = rng.normal(size=(sizes.sum() + 8, 7)).astype(np.float32)
    rhs = rng.normal(size=(len(sizes), 7, 3)).astype(np.float32)
    group_of_row = np.repeat(np.arange(len(sizes)), sizes)
    expected = np.zeros((lhs.shape[0], 3), np.float32)
    expected[: sizes.sum()] = np.einsum("mk,mkn->mn", lhs[: sizes.sum()], rhs[group_of_row])
    got = jax.jit(GROUPED_MATMUL_KERNELS[kernel])(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bias_update_follows_deepseek_v3_rule():
    cfg = moe_config(router="sigmoid", bias_update_rate=0.1)
    layer = make_layer(cfg)
    load = jnp.array([0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0])  # mean 1/8
    apply_bias_updates(layer, {"expert_load": load})
    np.testing.assert_allclose(layer.router.bias[...], 0.1 * np.sign(1 / 8 - np.asarray(load)))
    # The bias is not a parameter, so gradients, optimizers and parameter counts never see it.
    assert "bias" not in nnx.to_pure_dict(nnx.state(layer, nnx.Param))["router"]


def test_bias_update_is_skipped_at_rate_zero():
    layer = make_layer(moe_config())
    apply_bias_updates(layer, {"expert_load": jnp.eye(8)[0]})
    assert not np.any(np.asarray(layer.router.bias[...]))


def test_bad_configurations_name_the_field():
    with pytest.raises(ConfigError, match="mlp_bias"):
        make_layer(dataclasses.replace(moe_config(), mlp_bias=True))
    with pytest.raises(ConfigError, match="moe.grouped_matmul: no kernel registered under 'megablox'"):
        grouped_matmul_kernel("megablox")
    with pytest.raises(ConfigError, match="moe.experts_per_token"):
        moe_config(experts_per_token=9)
    with pytest.raises(ConfigError, match="moe.aux_loss_coef"):
        moe_config(aux_loss_coef=-1.0)
