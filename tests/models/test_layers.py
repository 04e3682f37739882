"""Layers against independent references: naive attention loops, published RoPE formulas (via
transformers' own implementations), norm formulas."""

import functools
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import RopeScaling
from models.layers import (
    AttentionMask,
    LayerNorm,
    RMSNorm,
    apply_rope,
    attention_kernel,
    attention_mask,
    chunked_attention,
    rope_frequencies,
)


def naive_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window):
    """Loop reference: softmax over the keys each query may see. q [B,T,N,H], k/v [B,S,K,H]."""
    b_, t_, n_, h_ = q.shape
    s_, k_ = k.shape[1], k.shape[2]
    group = n_ // k_
    out = np.zeros_like(q, dtype=np.float64)
    for b, n, t in itertools.product(range(b_), range(n_), range(t_)):
        visible = [
            s for s in range(s_)
            if kv_seg[b, s] == q_seg[b, t] and kv_pos[b, s] <= q_pos[b, t]
            and (window == 0 or q_pos[b, t] - kv_pos[b, s] < window)
        ]
        if not visible:
            continue
        scores = np.array([q[b, t, n] @ k[b, s, n // group] for s in visible]) / np.sqrt(h_)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[b, t, n] = sum(w * v[b, s, n // group] for w, s in zip(weights, visible))
    return out


# query_chunk 4 splits the 9 queries into 4 + 4 + 1; causal=False is the KV-cache path's mask.
@pytest.mark.parametrize("n_heads,n_kv_heads,window,causal,query_chunk", [
    (4, 4, 0, True, 4), (4, 2, 0, True, 4), (4, 1, 0, True, 4), (4, 2, 3, True, 4), (4, 2, 0, True, 128),
    (4, 2, 3, False, 4), (4, 2, 0, False, 128),
])
def test_attention_matches_naive_reference(n_heads, n_kv_heads, window, causal, query_chunk):
    rng = np.random.default_rng(0)
    b, t, h = 2, 9, 8
    q = rng.normal(size=(b, t, n_heads, h)).astype(np.float32)
    k = rng.normal(size=(b, t, n_kv_heads, h)).astype(np.float32)
    v = rng.normal(size=(b, t, n_kv_heads, h)).astype(np.float32)
    # Row 0: two packed documents then padding; row 1: one document.
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0], [1] * 9], np.int32)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 1], list(range(9))], np.int32)
    mask = AttentionMask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg), window, causal)
    kernel = attention_kernel("xla") if query_chunk == 128 else functools.partial(chunked_attention, query_chunk=query_chunk)
    got = np.asarray(kernel(q, k, v, mask))
    want = naive_attention(q, k, v, pos, pos, seg, seg, window)
    real = seg > 0  # padding rows attend among themselves; their output is never used
    np.testing.assert_allclose(got[real], want[real], atol=2e-5)


def test_causal_mask_is_the_document_mask_and_key_index_at_most_query_index():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 0, 1, 0]])
    dense = np.asarray(AttentionMask(pos, pos, seg, seg).dense())[0, 0]
    causal = np.asarray(AttentionMask(pos, pos, seg, seg, causal=True).dense())[0, 0]
    np.testing.assert_array_equal(dense, np.asarray(attention_mask(pos, pos, seg, seg))[0, 0])
    np.testing.assert_array_equal(causal[:4, :4], dense[:4, :4])  # packed documents: nothing changes
    np.testing.assert_array_equal(causal, dense & np.tri(5, dtype=bool))
    assert np.asarray(AttentionMask(pos, pos, seg, seg, causal=True).block(2, 4, 4)).shape == (1, 1, 2, 4)


def test_attention_mask_blocks_other_documents_and_future():
    seg = jnp.array([[1, 1, 2, 2]])
    pos = jnp.array([[0, 1, 0, 1]])
    mask = np.asarray(attention_mask(pos, pos, seg, seg))[0, 0]
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def _hf_inv_freq(kind, head_dim, theta, **params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=32768,
                      rope_parameters={"rope_type": kind, "rope_theta": theta, **params})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    return inv_freq.numpy(), scaling


@pytest.mark.parametrize(
    "scaling,hf_params",
    [
        (RopeScaling("linear", factor=4.0), {"factor": 4.0}),
        (RopeScaling("llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0, high_freq_factor=4.0),
         {"factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        (RopeScaling("yarn", factor=4.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0),
         {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}),
    ],
)
def test_rope_scalings_match_transformers(scaling, hf_params):
    head_dim, theta = 128, 500000.0
    ours, our_scale = rope_frequencies(head_dim, theta, scaling)
    theirs, their_scale = _hf_inv_freq(scaling.kind, head_dim, theta, **hf_params)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert our_scale == pytest.approx(their_scale)


def test_rope_is_a_rotation_with_relative_positions():
    """<rope(q, m), rope(k, n)> depends only on m - n (Su et al. 2021)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    inv_freq, _ = rope_frequencies(16, 10000.0, RopeScaling())

    def score(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([[m]]), inv_freq) * apply_rope(k, jnp.array([[n]]), inv_freq)))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([[5]]), inv_freq)), jnp.linalg.norm(q), rtol=1e-5)


def test_norms_match_formulas():
    x = np.random.default_rng(2).normal(size=(3, 10)).astype(np.float32)
    rms = RMSNorm(10, 1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(rms(jnp.asarray(x)), x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6), rtol=1e-5)
    ln = LayerNorm(10, 1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln(jnp.asarray(x)), want, rtol=1e-4, atol=1e-5)
