"""Sharding on a simulated 8-device mesh: golden parameter placements per preset, sharded forward
and gradient equal to unsharded, meshes for one and several slices."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.sharding_rules import DEFAULT_RULES, MESH_AXES
from models.config import PRESETS, get_preset
from models.decoder import Decoder
from models.sharding import (
    constrain,
    create_sharded,
    logical_to_mesh_spec,
    make_mesh,
    sharding_context,
    state_shardings,
)

GOLDEN = Path(__file__).with_name("golden_shardings.json")
GOLDEN_MESH = {"fsdp": 4, "tensor": 2}


def preset_shardings(name: str) -> dict[str, str]:
    """{param path: PartitionSpec} that the default rules give preset `name` on a fsdp=4 x tensor=2 mesh."""
    cfg = PRESETS[name]
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    shardings = state_shardings(nnx.state(abstract, nnx.Param), make_mesh(GOLDEN_MESH), DEFAULT_RULES)
    return {"/".join(map(str, path)): str(v.get_value().spec) for path, v in nnx.to_flat_state(shardings)}


def golden_presets() -> list[str]:
    return sorted(PRESETS)


@pytest.mark.parametrize("name", golden_presets())
def test_preset_parameter_shardings_match_golden_table(name):
    golden = json.loads(GOLDEN.read_text())
    assert name in golden, f"no golden table for {name}; regenerate with `python -m tests.models.test_sharding`"
    assert preset_shardings(name) == golden[name]


def test_golden_table_spot_checks():
    """Hand-checked entries: what the rules must do, independent of the generated table."""
    golden = json.loads(GOLDEN.read_text())
    qwen = golden["qwen2.5-coder-1.5b"]  # 12 heads, 2 KV heads, tied embeddings, QKV bias
    assert qwen["embed"] == str(P("tensor", "fsdp"))
    assert qwen["stacks/dense/blocks/attn/q_proj"] == str(P(None, "fsdp", "tensor", None))
    assert qwen["stacks/dense/blocks/attn/k_bias"] == str(P(None, "tensor", None))
    assert qwen["stacks/dense/blocks/ffn/mlp/down_proj"] == str(P(None, "tensor", "fsdp"))
    assert "lm_head" not in qwen
    llama = golden["llama-3-8b"]
    assert llama["lm_head"] == str(P("fsdp", "tensor"))
    # Scanned stacks keep their leading "layers" axis replicated.
    assert golden["starcoder2-3b"]["stacks/dense/blocks/attn_norm/bias"] == str(P(None, None))
    # MLA: heads over tensor; a down-projection's latent output whole, an up-projection's latent input
    # over fsdp (MaxText's q_lora / kv_lora rules); DeepSeek-V3's 256 experts over the expert axis,
    # expert widths over tensor.
    v3 = golden["deepseek-v3"]
    assert v3["stacks/moe/blocks/attn/kv_a_proj"] == str(P(None, "fsdp", None))
    assert v3["stacks/moe/blocks/attn/kv_b_proj"] == str(P(None, "fsdp", "tensor", None))
    assert v3["stacks/moe/blocks/attn/o_proj"] == str(P(None, "tensor", None, "fsdp"))
    assert v3["stacks/moe/blocks/ffn/experts/up"] == str(P(None, "expert", "fsdp", "tensor"))
    # Gemma 2: one stack of the sliding/global pair, a position index after "blocks"; the GeGLU gate like
    # SwiGLU's; post-norms replicated like the other norms.
    gemma2 = golden["gemma2-tiny"]
    assert gemma2["stacks/dense_sliding-dense_full/blocks/1/ffn/mlp/gate_proj"] == str(P(None, "fsdp", "tensor"))
    assert gemma2["stacks/dense_sliding-dense_full/blocks/0/post_ffn_norm/scale"] == str(P(None, None))
    # gpt-oss: a head's sink lives with its head (tensor); experts' biases follow their outputs' dims.
    oss = {k.removeprefix("stacks/moe_sliding-moe_full/blocks/0/"): v for k, v in golden["gpt-oss-20b"].items()}
    assert oss["attn/sinks"] == str(P(None, "tensor"))
    assert oss["ffn/experts/up_bias"] == str(P(None, "expert", "tensor"))
    assert oss["ffn/experts/down_bias"] == str(P(None, "expert", "fsdp"))


def test_indivisible_dimensions_are_replicated():
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    assert logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), DEFAULT_RULES, mesh, (64, 2, 16)) == P("fsdp", None, None)
    assert logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), DEFAULT_RULES, mesh, (64, 8, 16)) == P("fsdp", "tensor", None)


def test_a_mesh_axis_is_used_once_per_array():
    rules = (("a", "tensor"), ("b", ("tensor", "fsdp")))
    assert logical_to_mesh_spec(("a", "b"), rules) == P("tensor", "fsdp")


def _loss_and_grads(model, tokens):
    def loss(m):
        logits = m(tokens).logits
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return nnx.value_and_grad(loss)(model)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}])
def test_sharded_forward_and_gradient_equal_unsharded(mesh_shape):
    cfg = get_preset("tiny", vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(8, 16)))
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    ref_loss, ref_grads = _loss_and_grads(make(), tokens)

    mesh = make_mesh(mesh_shape)
    model = create_sharded(make, mesh, DEFAULT_RULES)
    assert model.embed.get_value().sharding.spec == logical_to_mesh_spec(("vocab", "embed"), DEFAULT_RULES, mesh)
    with sharding_context(mesh, DEFAULT_RULES):
        loss, grads = nnx.jit(_loss_and_grads)(model, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads, ref_grads)


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "activation_length", "activation_embed")) is x
    mesh = make_mesh({"data": 2, "fsdp": 4})
    with sharding_context(mesh, DEFAULT_RULES):
        y = jax.jit(lambda x: constrain(x * 2, ("batch", "activation_length", "activation_embed")))(x)
    assert y.sharding.spec[0] == ("data", "fsdp") and all(s is None for s in y.sharding.spec[1:])


def test_mesh_shapes_for_one_and_several_slices():
    mesh = make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 2}
    multi = make_mesh({"fsdp": 2, "tensor": 2}, dcn={"data": 2})
    assert multi.axis_names == MESH_AXES
    assert dict(multi.shape) == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
    # The DCN axis is outermost: each slice (half the devices) is one index of the data axis.
    ids = np.vectorize(lambda d: d.id)(multi.devices)
    assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}
    with pytest.raises(ValueError, match="mesh.ici"):
        make_mesh({"fsdp": 3})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({name: preset_shardings(name) for name in golden_presets()}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
