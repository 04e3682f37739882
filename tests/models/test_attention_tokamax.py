"""The tokamax kernel's mask mapping (per-query key ranges, no [T, S] array) against the dense reference,
values and gradients, run through tokamax's XLA ops: the Pallas GPU kernels (Mosaic, Triton) cannot
run here, and Triton's does not run in Pallas interpret mode on CPU (see models/attention/tokamax.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import tokamax as tokamax_kernel
from models.attention.tokamax import document_starts, fits, key_ranges, tokamax_attention
from tests.models.test_attention_kernels import assert_matches_reference, make_case, unpacked_case

CASES = {  # make_case arguments: row 0 packs three documents then padding, row 1 is one document
    "packed_gqa_window_softcap": dict(window=7, cap=3.0),
    "packed_causal_gqa": dict(),
    "mqa_value_dim": dict(kv=1, hv=6),
    "multi_head_window": dict(kv=4, window=3),
    "context_shard_window": dict(t=12, s=40, offset=24, window=9),
}
FAST = {"packed_gqa_window_softcap"}


def _params(cases):
    return [pytest.param(args, id=name, marks=() if name in FAST else pytest.mark.slow) for name, args in cases.items()]


def test_document_starts_are_the_first_row_of_each_run():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(document_starts(seg), [[0, 0, 0, 3, 3, 5, 6, 6], [0] * 8])


@pytest.mark.parametrize("args", [dict(window=7), dict(t=12, s=40, offset=24, window=9), dict(t=12, s=40, offset=24)])
def test_key_ranges_are_the_position_mask(args):
    """Keys [k_start, row index] of each query, as tokamax's `Mask` reads them, are the keys the
    reference's dense mask shows it, on every query including padding."""
    q, _, _, mask = make_case(**args)
    k_start, q_indices = key_ranges(mask, q.shape[1])
    rows = np.arange(q.shape[1]) + mask.q_offset if q_indices is None else np.asarray(q_indices)[0, 0]
    keys = np.arange(mask.kv_positions.shape[1])
    ranges = (keys >= np.asarray(k_start)[:, 0, :, None]) & (keys <= rows[:, None])
    np.testing.assert_array_equal(ranges, mask.dense()[:, 0])


@pytest.mark.parametrize("args", _params(CASES))
def test_tokamax_xla_matches_reference(args):
    """tokamax's dense XLA op given the mapped `Mask` equals the reference in outputs and gradients, padding
    queries included."""
    kernel = lambda q, k, v, mask: tokamax_attention(q, k, v, mask, implementation="xla")  # noqa: E731
    assert_matches_reference(kernel, *make_case(**args))


@pytest.mark.slow
@pytest.mark.parametrize("args", _params({name: CASES[name] for name in ("packed_gqa_window_softcap", "context_shard_window")}))
def test_tokamax_xla_chunked_matches_reference(args):
    kernel = lambda q, k, v, mask: tokamax_attention(q, k, v, mask, implementation="xla_chunked")  # noqa: E731
    assert_matches_reference(kernel, *make_case(**args))


def test_traced_query_offset_passes_row_indices():
    """Under context parallelism the shard's offset is traced (axis index * T): the queries' row
    indices go to tokamax as `q_indices` and the document starts are read at those rows."""
    q, k, v, mask = make_case(t=12, s=40, offset=24, window=9)

    def kernel(q, k, v, mask):
        traced = mask._replace(q_offset=jnp.int32(mask.q_offset))
        assert not traced.static_offset
        return tokamax_attention(q, k, v, traced, implementation="xla")

    assert_matches_reference(kernel, q, k, v, mask)


@pytest.mark.slow
def test_unpacked_rows_match_reference():
    kernel = lambda q, k, v, mask: tokamax_attention(q, k, v, mask, implementation="xla")  # noqa: E731
    assert_matches_reference(kernel, *unpacked_case(window=5))


def test_routes_what_tokamax_cannot_express_to_blockwise(monkeypatch):
    q, k, v, mask = make_case(t=8)
    assert fits(q, k, v, mask, "xla")
    assert fits(q.astype(jnp.bfloat16), k, v, mask._replace(logit_softcap=5.0), "mosaic")  # Mosaic's backward has it
    assert not fits(q, k, v, mask._replace(sinks=jnp.zeros(4)), "xla")  # no sink argument
    assert not fits(q, k, v, mask._replace(causal=False), "xla")  # the KV-cache path: positions are not row indices
    assert not fits(q, k, v, mask._replace(logit_softcap=5.0), "triton")  # Triton's backward pass has no soft-cap
    assert not fits(q, k, v, mask, "mosaic")  # float32: Mosaic's default precision is half only

    calls = []
    monkeypatch.setattr(tokamax_kernel, "blockwise_attention", lambda *args: calls.append(args) or args[0])
    tokamax_attention(q, k, v, mask._replace(causal=False), implementation="xla")
    tokamax_attention(q, k, v, mask, implementation="mosaic")
    assert len(calls) == 2
    jax.eval_shape(lambda q: tokamax_attention(q, k, v, mask, implementation="xla"), q)
    assert len(calls) == 2
