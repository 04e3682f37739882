"""Every attention kernel against the dense XLA reference, values and gradients, on packed documents,
causal and sliding-window masks, grouped heads and soft-capped scores; the reference against a loop.
The cuDNN kernel's mask arguments run through jax.nn's XLA path (no GPU here)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import (
    LONG_SEQUENCE,
    AttentionMask,
    attention_kernel,
    blockwise_attention,
    chunked_attention,
    reference_attention,
    xla_attention,
)
from models.attention.blockwise import (
    blockwise_attention_backward,
    blockwise_attention_with_lse,
    merge_partial_attention,
)
from models.attention.cudnn import cudnn_attention
from models.attention.cudnn import fits as cudnn_fits
from models.attention.splash import fits, splash_attention, splash_mask


def packed_rows(batch: int, length: int, doc_lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions [B, S]: row 0 packs documents of `doc_lengths` then padding (segment 0,
    positions counting on), the other rows are one document each."""
    seg = np.ones((batch, length), np.int32)
    pos = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    start = 0
    for doc, n in enumerate(doc_lengths, start=1):
        seg[0, start:start + n], pos[0, start:start + n] = doc, np.arange(n)
        start += n
    seg[0, start:], pos[0, start:] = 0, np.arange(length - start)
    return seg, pos


def make_case(*, t=40, s=None, n=4, kv=2, h=8, hv=None, window=0, causal=True, cap=0.0, offset=0, seed=0):
    """q [2, t, n, h], k [2, s, kv, h], v [2, s, kv, hv] and their mask; the queries are rows
    [offset, offset + t) of the key row (a context-parallel shard when t < s)."""
    s, hv = s or t, hv or h
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, t, n, h), (2, s, kv, h), (2, s, kv, hv)))
    seg, pos = packed_rows(2, s, [s // 4, s // 3, s // 4])
    q_seg, q_pos = seg[:, offset:offset + t], pos[:, offset:offset + t]
    mask = AttentionMask(jnp.asarray(q_pos), jnp.asarray(pos), jnp.asarray(q_seg), jnp.asarray(seg), window, causal, cap,
                         offset)
    return q, k, v, mask


def unpacked_case(lengths=(40, 31), **args):
    """`make_case` with one document per row followed by padding: row b holds `lengths[b]` tokens."""
    q, k, v, mask = make_case(**args)
    pos = np.tile(np.arange(q.shape[1], dtype=np.int32), (len(lengths), 1))
    seg = jnp.asarray(pos < np.asarray(lengths)[:, None], jnp.int32)
    return q, k, v, mask._replace(q_positions=jnp.asarray(pos), kv_positions=jnp.asarray(pos), q_segment_ids=seg,
                                  kv_segment_ids=seg, packed=False)


def assert_matches_reference(kernel, q, k, v, mask, atol=2e-5, valid=None):
    """Output and the gradients of a random projection of it equal the dense reference's (on the
    query rows where `valid` [B, T] is true, when given: padding queries' outputs are unspecified)."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*q.shape[:3], v.shape[-1])), jnp.float32)
    if valid is not None:
        weights = weights * jnp.asarray(valid)[:, :, None, None]

    def output_and_grads(fn):  # the mask's static fields stay Python values: closed over, not jit arguments
        def loss(q, k, v):
            out = fn(q, k, v, mask)
            return jnp.sum(out * weights), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (got_grads, got), (want_grads, want) = output_and_grads(kernel), output_and_grads(reference_attention)
    if valid is not None:
        got, want = got[np.asarray(valid)], want[np.asarray(valid)]
    np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=10 * atol, rtol=1e-4)


def loop_attention(q, k, v, mask):
    """Softmax over the keys each query may see, one query at a time, in float64 (causal by index)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_pos, kv_pos, q_seg, kv_seg = (np.asarray(x) for x in mask[:4])
    b_, t_, n_, h_ = q.shape
    group = n_ // k.shape[2]
    out = np.zeros((b_, t_, n_, v.shape[-1]))
    for b, t, n in itertools.product(range(b_), range(t_), range(n_)):
        seen = [s for s in range(k.shape[1]) if kv_seg[b, s] == q_seg[b, t] and kv_pos[b, s] <= q_pos[b, t]
                and (not mask.sliding_window or q_pos[b, t] - kv_pos[b, s] < mask.sliding_window)
                and (not mask.causal or s <= t + mask.q_offset)]
        scores = np.array([q[b, t, n] @ k[b, s, n // group] for s in seen]) / np.sqrt(h_)
        if mask.logit_softcap:
            scores = mask.logit_softcap * np.tanh(scores / mask.logit_softcap)
        weights = np.exp(scores - scores.max())
        out[b, t, n] = (weights / weights.sum()) @ v[b, seen, n // group]
    return out


@pytest.mark.parametrize("window,cap,offset", [pytest.param(0, 0.0, 0, marks=pytest.mark.slow), (5, 2.0, 6)])
def test_reference_is_the_loop_softmax(window, cap, offset):
    q, k, v, mask = make_case(t=11, s=17 if offset else None, window=window, cap=cap, offset=offset)
    np.testing.assert_allclose(reference_attention(q, k, v, mask), loop_attention(q, k, v, mask), atol=1e-5)


BLOCKWISE_CASES = {  # name: (make_case arguments, tile sizes); tiles of 8 x 16 split 40 rows unevenly
    "packed_gqa_window_softcap": (dict(window=7, cap=3.0), (8, 16)),
    "packed_causal_gqa": (dict(), (8, 16)),
    "mqa_value_dim": (dict(kv=1, hv=6), (8, 16)),
    "context_shard_window": (dict(t=12, s=40, offset=24, window=9), (4, 8)),
    "no_causal_flag": (dict(causal=False), (16, 8)),
    "one_tile": (dict(), (64, 64)),
    "multi_head_no_grouping": (dict(kv=4, window=3), (8, 8)),
}
SLOW = set(BLOCKWISE_CASES) - {"packed_gqa_window_softcap"}


@pytest.mark.parametrize("name", [n if n not in SLOW else pytest.param(n, marks=pytest.mark.slow) for n in BLOCKWISE_CASES])
def test_blockwise_matches_reference(name):
    args, (block_q, block_kv) = BLOCKWISE_CASES[name]
    kernel = lambda q, k, v, mask: blockwise_attention(q, k, v, mask, block_q, block_kv)  # noqa: E731
    assert_matches_reference(kernel, *make_case(**args))


HALVES = {0: (0, 20), -20: (20, 40)}  # the queries' row offset from a block's first key: the block's keys


def merged_halves(q, k, v, mask):
    """Attention over the first and the second half of the keys, each with its log-sum-exp, merged;
    and each half's mask."""
    def block(offset, lo, hi):
        return mask._replace(kv_positions=mask.kv_positions[:, lo:hi], kv_segment_ids=mask.kv_segment_ids[:, lo:hi],
                             q_offset=offset)

    masks = [block(offset, lo, hi) for offset, (lo, hi) in HALVES.items()]
    parts = [blockwise_attention_with_lse(q, k[:, lo:hi], v[:, lo:hi], m, 8, 8) for m, (lo, hi) in zip(masks, HALVES.values())]
    return merge_partial_attention(*parts[0], *parts[1]), masks


def test_blockwise_parts_merge_to_the_whole():
    """Ring attention's steps on one device: the halves' merged output is attention over all keys, and
    each half's backward under the merged output and log-sum-exp gives its share of the gradients."""
    q, k, v, mask = make_case(window=9)
    d_out = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    @jax.jit
    def ring_steps(q, k, v, d_out):
        (out, lse), masks = merged_halves(q, k, v, mask)
        grads = [blockwise_attention_backward(q, k[:, lo:hi], v[:, lo:hi], m, out, lse, d_out, 8, 8)
                 for m, (lo, hi) in zip(masks, HALVES.values())]
        return out, (grads[0][0] + grads[1][0], *(jnp.concatenate([g[i] for g in grads], axis=1) for i in (1, 2)))

    out, grads = ring_steps(q, k, v, d_out)
    want, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    for g, w in zip(grads, vjp(d_out)):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_blockwise_log_sum_exp_is_differentiable():
    """Gradients through the merge (the log-sum-exps' cotangents) equal the reference's."""
    assert_matches_reference(lambda q, k, v, mask: merged_halves(q, k, v, mask)[0][0], *make_case(window=9))


@pytest.mark.parametrize("args", [pytest.param(dict(), marks=pytest.mark.slow), dict(window=7, cap=3.0),
                                  pytest.param(dict(t=12, s=40, offset=24), marks=pytest.mark.slow)])
def test_chunked_matches_reference(args):
    kernel = lambda q, k, v, mask: chunked_attention(q, k, v, mask, query_chunk=16)  # noqa: E731
    assert_matches_reference(kernel, *make_case(**args))


def test_chunked_sink_gradients_equal_the_reference():
    """The chunked kernel's own backward pass (probabilities recomputed from the log-sum-exp) with
    attention sinks: gradients of q, k, v and the sink logits."""
    q, k, v, mask = make_case(t=24, window=7)
    mask = mask._replace(sinks=jnp.asarray(np.random.default_rng(3).normal(size=q.shape[2]), jnp.float32))
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

    def grads(kernel):
        def loss(q, k, v, sinks):
            return jnp.sum(kernel(q, k, v, mask._replace(sinks=sinks)) * cotangent)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, mask.sinks)

    chunked = functools.partial(chunked_attention, query_chunk=8)
    for name, got, want in zip("q k v sinks".split(), grads(chunked), grads(reference_attention)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=name)


def _temp_bytes(kernel, t: int) -> int:
    """Scratch memory XLA plans for the gradient of `kernel` at row length t (compiled, not run)."""
    q, k = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32), jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(q, k, pos, seg):
        return jnp.sum(kernel(q, k, k, AttentionMask(pos, pos, seg, seg, causal=True)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, k, ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_gradient_holds_no_query_by_key_array():
    """Traced, not compiled: no value of the forward or backward pass has a [T, S] = [1024, 1024] axis pair."""
    q, k, v, mask = make_case(t=1024, n=2, kv=1)

    def gradient_jaxpr(kernel):
        return str(jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v, mask)), argnums=(0, 1, 2)))(q, k, v))

    assert "1024,1024" in gradient_jaxpr(reference_attention)  # what the check looks for
    assert "1024,1024" not in gradient_jaxpr(blockwise_attention)


@pytest.mark.slow
def test_blockwise_memory_is_linear_in_length():
    """4x the tokens, at most ~4x the scratch, far below one [T, S] float32 score matrix."""
    short, long = _temp_bytes(blockwise_attention, 1024), _temp_bytes(blockwise_attention, 4096)
    assert long < 5 * short, (short, long)
    assert long < 2 * 4096 * 4096 * 4 / 16, long  # 2 heads


@pytest.mark.slow
def test_chunked_memory_grows_faster_than_blockwise():
    """The chunked kernel's unrolled chunks keep their [query_chunk, S] score blocks live together: ~T^2."""
    chunked, blockwise = _temp_bytes(chunked_attention, 4096), _temp_bytes(blockwise_attention, 4096)
    assert chunked > 4 * blockwise, (chunked, blockwise)


def test_xla_kernel_is_chunked_for_short_rows_and_blockwise_for_long():
    def loops_over_tiles(t):  # blockwise scans its tiles; the chunked kernel unrolls its chunks
        q, k, v, mask = make_case(t=t, n=2, kv=1)
        return "scan" in str(jax.make_jaxpr(lambda q, k, v: xla_attention(q, k, v, mask))(q, k, v))

    assert not loops_over_tiles(LONG_SEQUENCE) and loops_over_tiles(LONG_SEQUENCE + 1)


SPLASH_CASES = {
    "packed_causal_gqa": dict(t=256),
    "window_softcap": pytest.param(dict(t=256, window=100, cap=5.0, kv=1), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("args", SPLASH_CASES.values(), ids=SPLASH_CASES.keys())
def test_splash_kernel_in_interpret_mode_matches_reference(args):
    """JAX's Pallas splash kernel, run by the Pallas interpreter on CPU (128-row tiles)."""
    kernel = lambda q, k, v, mask: splash_attention(q, k, v, mask, block=128, interpret=True)  # noqa: E731
    q, k, v, mask = make_case(h=128, **args)
    assert_matches_reference(kernel, q, k, v, mask, atol=1e-4)


@pytest.mark.parametrize("window", [0, 5])
def test_splash_index_mask_with_segments_is_the_position_mask(window):
    """On packed rows (positions step by one within a document) splash's causal/local index mask
    and-ed with segment equality is `AttentionMask`'s position mask."""
    _, _, _, mask = make_case(t=40, window=window)
    index_mask = splash_mask(1, 40, window)[0, :, :]
    segments = np.asarray(mask.q_segment_ids)[:, :, None] == np.asarray(mask.kv_segment_ids)[:, None, :]
    np.testing.assert_array_equal(index_mask[None] & segments, np.asarray(mask.dense())[:, 0])


def test_splash_takes_whole_causal_rows_that_tile():
    q, k, v, mask = make_case(t=256)
    assert fits(q, k, mask, 128) and fits(q, k, mask, 512)  # one 256-row tile
    assert not fits(q, k, mask._replace(causal=False), 128)  # the KV-cache path
    q, k, _, mask = make_case(t=200)
    assert not fits(q, k, mask, 128)  # rows that do not tile
    q, k, v, mask = make_case(t=128, s=256, offset=128)  # a context-parallel shard of the queries
    assert not fits(q, k, mask, 128)


def test_unavailable_kernel_names_the_available_ones():
    with pytest.raises(ValueError, match="no kernel 'splash' on platform 'cpu'; available: blockwise, chunked, ring, xla"):
        attention_kernel("splash")


CUDNN_CASES = {  # unpacked rows of 40 and 31 tokens (the second right-padded)
    "window_gqa": dict(window=7),
    "causal_mqa": pytest.param(dict(kv=1), marks=pytest.mark.slow),
    "window_multi_head": pytest.param(dict(window=3, kv=4), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("args", CUDNN_CASES.values(), ids=CUDNN_CASES.keys())
def test_cudnn_mask_arguments_match_reference(args):
    """The arguments the cuDNN kernel passes to jax.nn.dot_product_attention (causal, window, row
    lengths; no mask array), run by jax.nn's XLA implementation, give the reference's outputs and
    gradients on every non-padding query."""
    q, k, v, mask = unpacked_case(**args)
    assert cudnn_fits(q, k, v, mask)
    kernel = lambda q, k, v, mask: cudnn_attention(q, k, v, mask, implementation="xla")  # noqa: E731
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: kernel(q, k, v, mask))(q, k, v))
    assert "custom_vjp" not in jaxpr  # jax.nn's path, not the blockwise fallback
    assert_matches_reference(kernel, q, k, v, mask, valid=mask.q_segment_ids != 0)


def test_cudnn_routes_what_its_arguments_cannot_express_to_blockwise():
    q, k, v, mask = unpacked_case()
    assert not cudnn_fits(q, k, v, mask._replace(packed=True))  # segment ids: no public cuDNN argument
    assert not cudnn_fits(q, k, v, mask._replace(logit_softcap=5.0))
    assert not cudnn_fits(q, k, v, mask._replace(causal=False))  # the KV-cache path
    assert not cudnn_fits(q, k, v[..., :6], mask)  # value head size != key head size (MLA)
    q_shard, k, v, shard = make_case(t=12, s=40, offset=24)
    assert not cudnn_fits(q_shard, k, v, shard._replace(packed=False))  # a context-parallel query shard

    def runs_blockwise(q, k, v, mask, implementation):
        fn = lambda q, k, v: cudnn_attention(q, k, v, mask, implementation=implementation)  # noqa: E731
        return "custom_vjp" in str(jax.make_jaxpr(fn)(q, k, v))

    assert runs_blockwise(q, k, v, mask._replace(packed=True), "xla")
    assert runs_blockwise(q, k, v, mask, "cudnn")  # float32: cuDNN's flash kernel is half precision only


def test_the_decoder_marks_rows_packed_only_when_given_segment_ids(monkeypatch):
    """A forward without segment ids promises one document per row (`packed=False`, what lets cuDNN
    take row lengths); with them, rows may hold several documents. Same logits either way."""
    from flax import nnx  # noqa: PLC0415

    from models.attention import ATTENTION_KERNELS, Kernel  # noqa: PLC0415
    from models.config import get_preset  # noqa: PLC0415
    from models.decoder import Decoder  # noqa: PLC0415

    seen = []

    def spy(q, k, v, mask):
        seen.append(mask.packed)
        return reference_attention(q, k, v, mask)

    monkeypatch.setitem(ATTENTION_KERNELS, "xla", Kernel(spy))
    cfg = get_preset("tiny", vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, scan_layers=False)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size
    unpacked = model(tokens).logits
    assert seen == [False, False]
    packed = model(tokens, segment_ids=jnp.ones_like(tokens)).logits
    assert seen[2:] == [True, True]
    np.testing.assert_allclose(unpacked, packed, atol=1e-6)
