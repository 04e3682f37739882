"""The decode floor's stand-in steps: XLA's and torch's do the same work, and its FLOP count is the
model's. (Their speeds are measured by `python -m bench.generate --workloads=floor`, not here.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bench.decode_floor import StepShape, floor_report, jax_step, random_inputs, torch_inputs, torch_step
from models.hf import reference

SHAPE = StepShape(batch=4, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, vocab=64, layers=2, slots=12)


@pytest.mark.parametrize("attention", [False, True])
def test_xla_and_torch_stand_ins_compute_the_same_step(attention):
    inputs = random_inputs(SHAPE)
    x = inputs.pop("x")
    ours = jax.jit(lambda x, args: jax_step(SHAPE, attention, x, **args))(jnp.asarray(x), jax.tree.map(jnp.asarray, inputs))
    theirs = torch_step(SHAPE, attention, torch.from_numpy(x), **torch_inputs(inputs))
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)
    if attention:  # the attention products change the step
        without = jax_step(SHAPE, False, jnp.asarray(x), **jax.tree.map(jnp.asarray, inputs))
        assert np.abs(np.asarray(without) - np.asarray(ours)).max() > 1e-3


def test_matmul_flops_and_weights_are_the_llama_models():
    model = reference.random_model("llama", hidden_size=SHAPE.d_model, num_hidden_layers=SHAPE.layers,
                                   num_attention_heads=SHAPE.n_heads, num_key_value_heads=SHAPE.n_kv_heads,
                                   intermediate_size=SHAPE.d_ff, vocab_size=SHAPE.vocab)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # projections, MLP, LM head
    assert SHAPE.matmul_flops() == 2 * SHAPE.batch * linear
    assert SHAPE.weight_bytes() == 4 * linear
    assert SHAPE.cache_bytes() == 4 * 2 * SHAPE.layers * SHAPE.batch * SHAPE.n_kv_heads * SHAPE.slots * SHAPE.head_dim


def test_the_report_times_every_stand_in():
    report = floor_report(SHAPE, repeats=1)
    times = [report[f"{lib}_{part}_ms_per_step"] for lib in ("xla", "torch") for part in ("matmuls", "matmuls_and_attention")]
    assert all(np.isfinite(t) and t > 0 for t in times)
    assert report["memory_read_gb_per_s"] > 0 and report["shape"]["slots"] == SHAPE.slots
