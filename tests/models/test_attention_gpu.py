"""The GPU attention kernels themselves (tokamax's Mosaic GPU and Triton flash kernels, cuDNN's) against
the dense reference, values and gradients, in bfloat16 on packed rows, windows, grouped heads, soft-cap
and context shards. Skipped without a GPU; run on one with

    JAX_PLATFORMS=cuda,cpu python -m pytest -q -m gpu tests/models/test_attention_gpu.py

Each case first checks that the call reaches the native kernel (`fits`, and a custom call of that
kernel in the lowered program), so a silent fallback to the blockwise kernel fails instead of passing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import reference_attention
from models.attention import tokamax as tokamax_kernel
from models.attention.cudnn import cudnn_attention
from models.attention.cudnn import fits as cudnn_fits
from tests.models.test_attention_kernels import make_case, unpacked_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)"),
]

# make_case arguments at kernel-sized shapes: row 0 packs three documents then padding, row 1 is one document
SHAPE = dict(t=512, n=8, kv=2, h=128)
CASES = {
    "packed_gqa": dict(SHAPE),
    "packed_gqa_window": dict(SHAPE, window=100),
    "packed_softcap": dict(SHAPE, cap=30.0),
    "mha_value_dim_64": dict(SHAPE, kv=8, hv=64),
    "context_shard": dict(SHAPE, t=256, s=1024, offset=512, window=300),
}
# The custom call each implementation lowers to (a substring of its target name).
CUSTOM_CALL = {"mosaic": "mosaic_gpu", "triton": "triton", "cudnn": "cudnn"}


def bf16_case(args):
    """A make_case case with bfloat16 inputs, and the same values in float32 for the reference."""
    q, k, v, mask = make_case(**args)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    return (q, k, v), tuple(x.astype(jnp.float32) for x in (q, k, v)), mask


def assert_close(got, want, what, rtol=2e-2):
    """Relative Frobenius error under `rtol` and no element off by more than 5 * rtol of the largest."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    worst = np.abs(got - want).max() / scale
    assert rel < rtol and worst < 5 * rtol, f"{what}: relative error {rel:.2e}, worst element {worst:.2e} of max"


def check_kernel(kernel, inputs, reference_inputs, mask, custom_call, valid=None):
    """Output and the gradients of a random projection of it equal the reference's (on the query rows
    where `valid` [B, T] is true, when given: outputs of padding queries are unspecified)."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*inputs[0].shape[:3], inputs[2].shape[-1])), jnp.float32)
    if valid is not None:
        weights = weights * jnp.asarray(valid)[:, :, None, None]

    def output_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v, mask).astype(jnp.float32)
            return jnp.sum(out * weights), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    program = output_and_grads(kernel).lower(*inputs).as_text().lower()
    assert custom_call in program, f"no {custom_call} custom call in the lowered program: the kernel fell back"
    got_grads, got = output_and_grads(kernel)(*inputs)
    want_grads, want = output_and_grads(reference_attention)(*reference_inputs)
    if valid is not None:
        got, want = got[np.asarray(valid)], want[np.asarray(valid)]
    assert_close(got, want, "output")
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert_close(g, w, f"d{name}")


@pytest.mark.parametrize("implementation", ["mosaic", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_tokamax_kernel_matches_reference(implementation, name):
    inputs, reference_inputs, mask = bf16_case(CASES[name])
    if implementation == "triton" and mask.logit_softcap:
        pytest.skip("Triton's backward pass has no soft-cap: routed to the blockwise kernel (test_attention_tokamax)")
    if implementation == "mosaic" and name == "mha_value_dim_64":
        pytest.skip("Mosaic GPU's kernel needs the value head size of the keys")

    def kernel(q, k, v, mask):
        if not mask.static_offset or mask.q_offset:  # a context shard's offset is traced: axis index * T
            mask = mask._replace(q_offset=jnp.int32(mask.q_offset))
        assert tokamax_kernel.fits(q, k, v, mask, implementation)
        return tokamax_kernel.tokamax_attention(q, k, v, mask, implementation=implementation)

    check_kernel(kernel, inputs, reference_inputs, mask, CUSTOM_CALL[implementation])


def test_default_implementation_is_mosaic_on_hopper():
    kind = jax.devices()[0].device_kind
    if "H100" in kind or "H200" in kind:
        assert tokamax_kernel.default_implementation() == "mosaic"


@pytest.mark.parametrize("window", [0, 100])
def test_cudnn_kernel_matches_reference(window):
    """Unpacked rows (one document, then padding): the only rows jax.nn's mask arguments express."""
    lengths = (512, 301)
    _, _, _, mask = unpacked_case(lengths=lengths, **dict(SHAPE, window=window))
    inputs, reference_inputs, _ = bf16_case(dict(SHAPE, window=window))
    assert cudnn_fits(*inputs, mask)
    valid = np.arange(SHAPE["t"])[None] < np.asarray(lengths)[:, None]
    check_kernel(cudnn_attention, inputs, reference_inputs, mask, CUSTOM_CALL["cudnn"], valid)
