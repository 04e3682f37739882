"""DeepSeek-V3 multi-token prediction (models/mtp.py, train/step.py): the loss equals a hand-written
computation of the paper's formula on packed rows, depth k sees no token past t_{i+k}, gradients reach
the heads, mtp_depth=0 (or weight 0) leaves the main loss and its gradients as they were, the counts and
the sharding rules cover the new parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.sharding_rules import DEFAULT_RULES
from models.config import MLAConfig, MoEConfig, get_preset
from models.decoder import Decoder, count_params
from models.moe import apply_bias_updates
from models.sharding import make_mesh, state_shardings
from train.step import next_token_loss

CFG = get_preset("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, mtp_depth=2,
                 mtp_loss_weight=0.3)


def packed_batch() -> dict[str, jax.Array]:
    """Row 0: documents of 5 and 4 tokens, then one padding slot; row 1: one document whose first
    three pairs are untrained (an SFT prompt)."""
    t = 10
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, t + 1))
    seg = np.array([[1] * 5 + [2] * 4 + [0], [1] * t], np.int32)
    pos = np.array([list(range(5)) + list(range(4)) + [0], list(range(t))], np.int32)
    mask = (seg > 0).astype(np.float32)
    mask[1, :3] = 0
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "positions": jnp.asarray(pos),
            "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask)}


def rms_norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.norm_eps) * scale


def cross_entropy(logits: np.ndarray, target: int) -> float:
    z = logits.max()
    return float(z + np.log(np.exp(logits - z).sum()) - logits[target])


def reference_sums(model: Decoder, batch: dict[str, jax.Array]) -> list[float]:
    """Summed cross-entropies over the trained pairs: the main head's, then depth k's
    -log P^k_i[t_{i+k+1}] (DeepSeek-V3 eq. 21-25), written out position by position. The trunk and the
    depths' blocks are the model's own (shared decoder code); the padding past a row's end differs."""
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    seg, mask = np.asarray(batch["segment_ids"]), np.asarray(batch["loss_mask"])
    embed = np.asarray(model.embed[...])  # tied: also the output head
    h = np.asarray(nnx.jit(lambda m: m.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])[0])(model))
    b, t = inputs.shape
    sums = [sum(cross_entropy(h[r, i] @ embed.T, targets[r, i]) for r in range(b) for i in range(t) if mask[r, i] > 0)]
    block = nnx.jit(lambda stack, x: stack(x, batch["positions"], batch["segment_ids"], None)[0])
    for k, depth in enumerate(model.mtp.depths, start=1):
        ahead = np.array([[inputs[r, i + k] if i + k < t else 7 for i in range(t)] for r in range(b)])
        x = np.concatenate([rms_norm(h, np.asarray(depth.hidden_norm.scale[...])),
                            rms_norm(embed[ahead], np.asarray(depth.embed_norm.scale[...]))], axis=-1)
        h = np.asarray(block(depth.stacks[f"mtp_{k}"], jnp.asarray(x @ np.asarray(depth.proj[...]), jnp.float32)))
        logits = rms_norm(h, np.asarray(depth.norm.scale[...])) @ embed.T
        sums.append(sum(
            cross_entropy(logits[r, i], targets[r, i + k])  # the pair (t_{i+k}, t_{i+k+1})
            for r in range(b) for i in range(t - k)
            if seg[r, i + k] == seg[r, i] != 0 and mask[r, i + k] > 0
        ))
    return sums


@pytest.mark.parametrize("chunk", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_loss_equals_the_hand_written_formula(chunk):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    batch = packed_batch()
    out = nnx.jit(lambda model: next_token_loss(model, batch, chunk=chunk))(model)
    main, *depths = reference_sums(model, batch)
    n = float(batch["loss_mask"].sum())
    assert float(out.weight) == n == 5 + 4 + 7
    np.testing.assert_allclose(out.metrics["xent"], main / n, rtol=1e-5)
    for k, s in enumerate(depths, start=1):
        np.testing.assert_allclose(out.metrics[f"mtp_loss/{k}"], s / n, rtol=1e-5)
    np.testing.assert_allclose(out.total, main + 0.3 / 2 * sum(depths), rtol=1e-5)


def test_depth_k_sees_no_token_past_i_plus_k():
    model = Decoder(CFG, rngs=nnx.Rngs(1))
    batch = packed_batch()
    inputs, positions, seg = batch["inputs"], batch["positions"], jnp.ones_like(batch["segment_ids"])

    @nnx.jit
    def states(model, tokens):
        hidden = model.hidden_states(tokens, positions, seg)[0]
        return model.mtp(model.embed_tokens, hidden, tokens, positions, seg)[0]

    changed = 6
    before = states(model, inputs)
    after = states(model, inputs.at[:, changed].set((inputs[:, changed] + 1) % CFG.vocab_size))
    for k, (a, b) in enumerate(zip(before, after), start=1):
        np.testing.assert_array_equal(a[:, :changed - k], b[:, :changed - k])
        assert np.abs(a[:, changed - k] - b[:, changed - k]).max() > 0


@pytest.mark.slow
def test_gradients_reach_the_heads_and_weight_zero_leaves_the_main_gradients():
    batch = packed_batch()

    def grads(cfg):
        return nnx.jit(nnx.grad(lambda m: next_token_loss(m, batch).total))(Decoder(cfg, rngs=nnx.Rngs(0)))

    with_mtp, zero_weight, without = grads(CFG), grads(CFG.replace(mtp_loss_weight=0.0)), grads(CFG.replace(mtp_depth=0))
    for path, g in nnx.to_flat_state(nnx.state(with_mtp.mtp, nnx.Param)):
        assert np.abs(g.get_value()).max() > 0, path
    for path, g in nnx.to_flat_state(nnx.state(zero_weight.mtp, nnx.Param)):
        assert np.abs(g.get_value()).max() == 0, path
    trunk = lambda g: {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(g, nnx.Param)) if p[0] != "mtp"}  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), trunk(zero_weight), trunk(without))
    assert not np.allclose(with_mtp.embed.get_value(), without.embed.get_value())  # the shared embedding and head


def mla_moe_config(**overrides):
    """deepseek-v3-tiny's kind of model (MLA with a query bottleneck, sigmoid-routed MoE with bias updates)."""
    mla = MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    moe = MoEConfig(num_experts=4, experts_per_token=2, expert_d_ff=16, first_dense_layers=1, router="sigmoid",
                    bias_update_rate=0.1)
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, mtp_depth=1, mla=mla, moe=moe)
    return get_preset("tiny", **{**fields, **overrides})


def test_parameter_count_and_sharding_rules_cover_the_heads():
    for cfg in (CFG, CFG.replace(tie_embeddings=False), mla_moe_config()):
        abstract = nnx.eval_shape(lambda cfg=cfg: Decoder(cfg, rngs=nnx.Rngs(0)))
        assert count_params(abstract) == cfg.param_count()
    base = mla_moe_config(mtp_depth=0)
    assert mla_moe_config().param_count(active=True) > base.param_count(active=True)
    assert mla_moe_config().flops_per_token(16) > base.flops_per_token(16)
    specs = state_shardings(nnx.state(abstract, nnx.Param), make_mesh({"fsdp": 4, "tensor": 2}), DEFAULT_RULES)
    specs = {"/".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(specs)}
    assert specs["mtp/depths/0/proj"] == P(None, "fsdp")
    assert specs["mtp/depths/0/stacks/mtp_1/blocks/attn/kv_b_proj"] == P(None, "fsdp", "tensor", None)
    assert specs["mtp/depths/0/stacks/mtp_1/blocks/ffn/experts/up"] == P(None, "expert", "fsdp", "tensor")


@pytest.mark.slow
def test_mtp_moe_router_bias_is_updated_from_its_own_load():
    model = Decoder(mla_moe_config(dtype="float32"), rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m: next_token_loss(m, packed_batch()))(model)
    assert out.metrics["mtp_1/expert_load"].shape == (1, 4) and "mtp_1/loss_load_balancing" in out.metrics
    router = model.mtp.depths[0].stacks["mtp_1"].blocks.ffn.router
    before = np.asarray(router.bias[...])
    apply_bias_updates(model, out.metrics)
    load = np.asarray(out.metrics["mtp_1/expert_load"])
    np.testing.assert_allclose(router.bias[...], before + 0.1 * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)
