"""The KV-cache sampler against the model run without a cache: greedy tokens equal step-by-step
argmax over full forward passes (with shared prefill, continuous batching and attention windows),
returned log-probabilities equal a full forward pass's, group samples from one shared prefill equal
independently prefilled ones, a prompt's samples do not depend on the rest of the batch, new
parameters reuse compiled programs, truncation keeps samples inside top-k / nucleus sets, EOS / stop
strings end sequences, a mesh changes nothing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.sharding_rules import DEFAULT_RULES
from data.hf_tokenizer import HFTokenizer
from models import sampler as sampler_module
from models.config import MoEConfig, get_preset
from models.decoder import Decoder
from models.layers import slot_attention
from models.sampler import (
    Sampler,
    bucket,
    inverse_cdf_sample,
    max_and_first_argmax,
    unrolled,
    window_bucket,
)
from models.sharding import create_sharded, make_mesh

VOCAB = 128
PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2], [64, 1, 8, 30, 21, 77, 90, 4, 13, 55, 6]]


def tiny(**overrides):
    # init_std 0.2 gives logits of std ~1.5: peaked enough that greedy ties do not occur.
    fields = dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, dtype="float32",
                  init_std=0.2, max_seq_len=256)
    return get_preset("tiny", **{**fields, **overrides})


CONFIGS = {
    "dense": tiny(),
    "dense-window-unrolled": tiny(sliding_window=4, scan_layers=False, qkv_bias=True),
    "moe": tiny(qk_norm=True, moe=MoEConfig(num_experts=4, experts_per_token=2, expert_d_ff=64, first_dense_layers=1)),
}


@pytest.fixture(scope="module")
def model():
    return Decoder(CONFIGS["dense"], rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens):
    return model(tokens).logits


def full_forward_logits(model, sequence, padded_length=64):
    """Logits [len(sequence), V] of one uncached forward pass (right-padded to one compiled length;
    causal attention keeps the padding invisible to the real tokens)."""
    tokens = np.zeros((1, padded_length), np.int32)
    tokens[0, : len(sequence)] = sequence
    return np.asarray(_forward(model, jnp.asarray(tokens)))[0, : len(sequence)]


def greedy_without_cache(model, prompt, steps):
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(np.argmax(full_forward_logits(model, sequence)[-1])))
    return sequence[len(prompt):]


def full_forward_logprobs(model, prompt, generated, temperature=1.0):
    logits = full_forward_logits(model, prompt + generated)[len(prompt) - 1 : -1] / temperature
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return logp[np.arange(len(generated)), generated]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_with_cache_equals_step_by_step_without(name):
    model = Decoder(CONFIGS[name], rngs=nnx.Rngs(0))
    out = Sampler(model).generate(PROMPTS, max_new_tokens=9)
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        assert tokens == greedy_without_cache(model, prompt, 9)
        np.testing.assert_allclose(logprobs, full_forward_logprobs(model, prompt, tokens), atol=2e-5)
    assert out.finish_reasons == ["length"] * 3 and list(out.lengths) == [9, 9, 9]
    np.testing.assert_allclose(out.logprob_sums, [lp.sum() for lp in out.logprobs], rtol=1e-6)


def test_sampled_logprobs_equal_full_forward_at_temperature(model):
    out = Sampler(model).generate(PROMPTS, max_new_tokens=8, temperature=0.7, seed=3)
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        np.testing.assert_allclose(logprobs, full_forward_logprobs(model, prompt, tokens, 0.7), atol=2e-5)
    again = Sampler(model).generate(PROMPTS, max_new_tokens=8, temperature=0.7, seed=3)
    assert again.tokens == out.tokens  # deterministic given the seed
    other = Sampler(model).generate(PROMPTS, max_new_tokens=8, temperature=0.7, seed=4)
    assert other.tokens != out.tokens


@pytest.mark.parametrize("top_k, top_p", [(0, 0.6), (8, 0.7)])
def test_truncated_samples_stay_in_the_kept_set(top_k, top_p):
    model = Decoder(tiny(), rngs=nnx.Rngs(1))
    temperature = 1.5
    prompts = PROMPTS * 4
    out = Sampler(model).generate(prompts, max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    for prompt, tokens in zip(prompts, out.tokens):
        logits = full_forward_logits(model, prompt + tokens)[len(prompt) - 1 : -1] / temperature
        for step_logits, token in zip(logits, tokens):
            order = np.argsort(-step_logits)
            kept = order[:top_k] if top_k else order
            probs = np.exp(step_logits[kept] - step_logits[kept].max())
            probs /= probs.sum()
            mass_before = np.cumsum(probs) - probs
            kept = kept[mass_before < top_p - 1e-6]
            assert token in kept


def test_degenerate_truncation_is_greedy(model):
    greedy = Sampler(model).generate(PROMPTS, max_new_tokens=6)
    assert Sampler(model).generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1, top_p=1e-6, seed=9).tokens == greedy.tokens


def test_eos_ends_each_sequence_where_it_appears(model):
    greedy = Sampler(model).generate(PROMPTS, max_new_tokens=10)
    eos = greedy.tokens[0][3]  # a token row 0 emits at step 3
    out = Sampler(model).generate(PROMPTS, max_new_tokens=10, stop_token_ids=[eos])
    for full, tokens, reason in zip(greedy.tokens, out.tokens, out.finish_reasons):
        if eos in full:
            assert tokens == full[: full.index(eos) + 1] and reason == "eos"
        else:
            assert tokens == full and reason == "length"
    assert out.finish_reasons[0] == "eos" and len(out.tokens[0]) <= 4


def test_stop_strings_cut_text_and_tokens(tmp_path):
    from tests.models.test_hf_tokenizer import byte_level_tokenizer

    tokenizer = HFTokenizer(byte_level_tokenizer(tmp_path))
    model = Decoder(tiny(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(2))
    sampler = Sampler(model, tokenizer, stop_check_interval=4)
    prompts = ["def add(a, b):", "import json\n"]
    free = sampler.generate(prompts, max_new_tokens=24, temperature=1.0, seed=1)
    assert free.texts == [tokenizer.decode(t) for t in free.tokens]  # no EOS was produced, so text is all tokens
    stop = free.texts[0][5:8]
    out = sampler.generate(prompts, max_new_tokens=24, temperature=1.0, seed=1, stop=[stop])
    cut = free.texts[0].index(stop)
    assert out.texts[0] == free.texts[0][:cut] and out.finish_reasons[0] == "stop"
    # The tokens end with the one that completed the stop string.
    assert out.tokens[0] == free.tokens[0][: len(out.tokens[0])]
    assert stop in tokenizer.decode(out.tokens[0]) and stop not in tokenizer.decode(out.tokens[0][:-1])
    assert len(out.logprobs[0]) == len(out.tokens[0])


def test_string_prompts_get_bos_and_chat_prompts_are_ids(tmp_path):
    from tests.models.test_hf_tokenizer import MESSAGES, metaspace_tokenizer

    tokenizer = HFTokenizer(metaspace_tokenizer(tmp_path))
    model = Decoder(tiny(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(3))
    chat = tokenizer.apply_chat_template(MESSAGES)
    assert chat[0] == tokenizer.bos_id  # the template writes it
    prompts = Sampler(model, tokenizer).encode_prompts(["def f(x):", chat])
    assert prompts == [[tokenizer.bos_id, *tokenizer.encode("def f(x):")], chat]
    assert Sampler(model, tokenizer, add_bos=False).encode_prompts(["def f(x):"]) == [tokenizer.encode("def f(x):")]


@pytest.mark.parametrize("name, mesh_shape", [
    ("dense", {"fsdp": 2, "tensor": 2, "data": 2}),
    pytest.param("moe", {"fsdp": 2, "expert": 2, "tensor": 2}, marks=pytest.mark.slow),  # expert-parallel all-to-all
])
def test_sharded_mesh_gives_the_same_tokens(name, mesh_shape):
    cfg = CONFIGS[name]
    reference = Sampler(Decoder(cfg, rngs=nnx.Rngs(0))).generate(PROMPTS, max_new_tokens=6)
    mesh = make_mesh(mesh_shape)
    sharded = create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh, DEFAULT_RULES)
    out = Sampler(sharded, mesh=mesh, rules=DEFAULT_RULES).generate(PROMPTS, max_new_tokens=6)
    assert out.tokens == reference.tokens
    np.testing.assert_allclose(out.logprob_sums, reference.logprob_sums, atol=1e-4)


def test_data_parallel_decode_communicates_only_the_loop_condition(monkeypatch):
    """Rows sharded over the data axis: every step writes the cache and the tokens with per-row
    scatters, so the decode program's one collective is the all-reduce of the loop's done count (a
    scatter indexed by (row, slot) pairs made GSPMD all-gather its indices and updates at every step)."""
    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    model = create_sharded(lambda: Decoder(CONFIGS["dense"], rngs=nnx.Rngs(0)), mesh, DEFAULT_RULES)
    decode, calls = sampler_module._decode, []

    def recording(*args, **kwargs):
        def abstract(x):  # mesh-placed arrays keep their sharding; host scalars stay uncommitted
            sharding = x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else None
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        calls.append(jax.tree.map(lambda x: abstract(x) if isinstance(x, jax.Array) else x, (args, kwargs)))
        return decode(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "_decode", recording)
    Sampler(model, mesh=mesh, rules=DEFAULT_RULES).generate(PROMPTS, max_new_tokens=4)
    args, kwargs = calls[0]
    hlo = decode.lower(*args, **kwargs).compile().as_text()
    collectives = re.findall(r"= \S+ (all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)(?:-start)?\(", hlo)
    assert collectives == ["all-reduce"]


def compiled_programs():
    return tuple(f._cache_size() for f in (sampler_module._prefill, sampler_module._insert, sampler_module._decode))


def test_same_buckets_and_structure_share_compiled_programs(model):
    sampler = Sampler(model)
    sampler.generate(PROMPTS, max_new_tokens=9)
    compiled = compiled_programs()
    # Other lengths in the same buckets (batch 3 -> 4, prompts <= 16, budget <= 16): nothing new to compile.
    sampler.generate([[4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6], [3], [9, 9], [1]], max_new_tokens=16)
    # A sampler for new weights of the same model reuses the programs too.
    Sampler(Decoder(CONFIGS["dense"], rngs=nnx.Rngs(7))).generate(PROMPTS, max_new_tokens=9)
    assert compiled_programs() == compiled
    assert bucket(7, 16) == bucket(3, 16) == 16 and bucket(17, 16) == 32 and bucket(3, 1) == 4
    assert [window_bucket(n, 16, 256) for n in (1, 17, 24, 25, 33, 49, 200)] == [16, 24, 24, 32, 48, 64, 256]


def test_new_params_as_arguments_reuse_programs(model):
    """The RL loop: one sampler, new weights every step, passed as an argument."""
    other = Decoder(CONFIGS["dense"], rngs=nnx.Rngs(5))
    sampler = Sampler(model)
    first = sampler.generate(PROMPTS, max_new_tokens=7, temperature=1.0, seed=2)
    compiled = compiled_programs()
    updated = sampler.generate(PROMPTS, max_new_tokens=7, temperature=1.0, seed=2, params=nnx.state(other))
    assert compiled_programs() == compiled
    assert updated.tokens == Sampler(other).generate(PROMPTS, max_new_tokens=7, temperature=1.0, seed=2).tokens
    assert updated.tokens != first.tokens
    for prompt, tokens, logprobs in zip(PROMPTS, updated.tokens, updated.logprobs):
        np.testing.assert_allclose(logprobs, full_forward_logprobs(other, prompt, tokens), atol=2e-5)
    sampler.set_params(other)
    assert sampler.generate(PROMPTS, max_new_tokens=7, temperature=1.0, seed=2).tokens == updated.tokens
    with pytest.raises(ValueError, match="structure, shapes or dtypes differ"):
        sampler.generate(PROMPTS, max_new_tokens=7, params=nnx.state(Decoder(tiny(n_layers=3), rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_greedy_with_groups_refills_and_windows_equals_decoding_without_cache(name):
    """n samples per prompt from one prefill, 2 rows for 6 requests (continuous batching), windows
    that grow every 3 steps, an EOS that ends some samples early: greedy tokens are still the
    uncached model's."""
    model = Decoder(CONFIGS[name], rngs=nnx.Rngs(0))
    reference = [greedy_without_cache(model, prompt, 12) for prompt in PROMPTS]
    eos = reference[1][4]
    sampler = Sampler(model, max_rows=2, decode_chunk=3, min_bucket=4)
    out = sampler.generate(PROMPTS, max_new_tokens=12, n=2, stop_token_ids=[eos])
    assert list(out.prompt_index) == [0, 0, 1, 1, 2, 2] and list(out.sample_index) == [0, 1] * 3
    for i, tokens in enumerate(out.tokens):
        full = reference[out.prompt_index[i]]
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert tokens == expected
        np.testing.assert_allclose(out.logprobs[i], full_forward_logprobs(model, PROMPTS[out.prompt_index[i]], tokens),
                                   atol=2e-5)
    assert out.finish_reasons[2] == "eos"


def long_tailed(model):
    """A sampler (whose drain tail shrinks its 4 rows down to 1) and EOS ids under which sampled
    lengths vary from 1 to 24 tokens."""
    return Sampler(model, max_rows=4, decode_chunk=4, drain_rows=1), dict(max_new_tokens=24, temperature=1.0, stop_token_ids=[3, 50, 77])


def test_shared_prefill_group_samples_equal_independently_prefilled_ones(model):
    sampler, kwargs = long_tailed(model)
    shared = sampler.generate(PROMPTS, n=4, seed=[11, 12, 13], **kwargs)
    separate = Sampler(model, max_rows=4, decode_chunk=4, share_prefill=False).generate(PROMPTS, n=4, seed=[11, 12, 13], **kwargs)
    assert shared.tokens == separate.tokens
    assert len(set(map(len, shared.tokens))) > 3  # lengths vary: rows were refilled mid-way
    assert shared.timing["prompt_tokens"] < separate.timing["prompt_tokens"]
    for a, b in zip(shared.logprobs, separate.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_continuous_batching_keeps_each_prompts_samples_independent_of_the_batch(model):
    sampler, kwargs = long_tailed(model)
    target = [9, 8, 7, 6, 5]
    alone = Sampler(model, max_rows=16).generate([target], n=3, seed=[42], **kwargs)
    crowded = sampler.generate([PROMPTS[0], target, *PROMPTS[1:], PROMPTS[0]], n=3, seed=[1, 42, 2, 3, 4], **kwargs)
    assert crowded.timing["shrinks"] >= 1 and alone.timing["shrinks"] == 0
    rows = [i for i, g in enumerate(crowded.prompt_index) if g == 1]
    assert [crowded.tokens[i] for i in rows] == alone.tokens
    assert len({tuple(t) for t in alone.tokens}) == 3  # the samples of a prompt differ from each other
    for i, logprobs in zip(rows, alone.logprobs):
        np.testing.assert_allclose(crowded.logprobs[i], logprobs, atol=1e-5)
    scored = sampler.score(crowded.prompt_tokens, crowded.tokens)
    for i, (prompt, tokens) in enumerate(zip(crowded.prompt_tokens, crowded.tokens)):
        np.testing.assert_allclose(crowded.logprobs[i], scored[i], atol=2e-5)
        np.testing.assert_allclose(scored[i], full_forward_logprobs(model, prompt, tokens), atol=2e-5)


def test_top_k_logprobs_are_the_full_forward_passes(model):
    out = Sampler(model).generate(PROMPTS, max_new_tokens=5, temperature=0.8, seed=1, logprobs_top_k=3)
    for prompt, tokens, ids, logprobs in zip(PROMPTS, out.tokens, out.top_ids, out.top_logprobs):
        logits = full_forward_logits(model, prompt + tokens)[len(prompt) - 1 : -1] / 0.8
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        assert ids.shape == (5, 3) and (ids == np.argsort(-logp, axis=-1)[:, :3]).all()
        np.testing.assert_allclose(logprobs, np.take_along_axis(logp, ids, axis=-1), atol=2e-5)
    assert Sampler(model).generate(PROMPTS, max_new_tokens=2).top_ids is None


def test_bad_requests_are_clear_errors(model):
    sampler = Sampler(model, max_len=32)
    with pytest.raises(ValueError, match="exceeds max_len=32"):
        sampler.generate([[1] * 30], max_new_tokens=5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([[1], []], max_new_tokens=5)
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        sampler.generate(["hello"], max_new_tokens=5)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        sampler.generate([[VOCAB]], max_new_tokens=5)


def test_evals_generator_samples_groups_from_one_call(tmp_path):
    from evals.generation import SamplerGenerator
    from tests.models.test_hf_tokenizer import byte_level_tokenizer

    tokenizer = HFTokenizer(byte_level_tokenizer(tmp_path))
    sampler = Sampler(Decoder(tiny(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(2)), tokenizer)
    prompts = ["def add(a, b):", "import json\n"]
    texts = SamplerGenerator(sampler, seed=5).generate(prompts, 3, 8, 1.0, ["\n\n"])
    expected = sampler.generate(prompts, 8, n=3, temperature=1.0, stop=["\n\n"], seed=5).texts
    assert texts == [expected[:3], expected[3:]] and len(set(texts[0])) > 1


@pytest.mark.parametrize("block", [128, 7])  # 300 entries: ragged (padded) last block
def test_max_and_first_argmax_is_argmax_with_ties(block):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(64, 300)).astype(np.float32)  # many ties, in and across blocks: the first index wins
    x[5, :] = -np.inf
    x[3] = np.nan
    top, index = map(np.asarray, max_and_first_argmax(jnp.asarray(x), block))
    rows = np.arange(64) != 3
    assert (index[rows] == np.argmax(x, axis=-1)[rows]).all() and (top[rows] == x[rows].max(axis=-1)).all()
    assert 0 <= int(index[3]) < 300


@pytest.mark.parametrize("size", [300, 8])  # several blocks with a ragged last one; one padded block
def test_inverse_cdf_sample_follows_the_softmax(size):
    """Stratified uniforms (i + 1/2) / n: an exact inverse CDF gives each entry n * p_i draws to
    within one, and never an excluded (-inf) entry."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, size).astype(np.float32)
    logits[rng.choice(size, size // 4, replace=False)] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    n = 20000
    uniform = (np.arange(n) + 0.5) / n
    draws = np.asarray(inverse_cdf_sample(jnp.asarray(np.broadcast_to(logits, (n, size))), jnp.asarray(uniform, jnp.float32)))
    counts = np.bincount(draws, minlength=size)
    assert counts[np.isinf(logits)].sum() == 0
    np.testing.assert_allclose(counts, n * probs, atol=1.5)


def test_slot_attention_decode_step_equals_the_general_form():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((3, 1, 8, 16), (3, 2, 24, 16), (3, 2, 24, 16)))
    mask = jnp.asarray(np.arange(24)[None, None, :] <= np.array([5, 23, 0])[:, None, None])
    step = slot_attention(q, k, v, mask)
    # The general path, on two queries where the second repeats the first.
    twice = slot_attention(jnp.concatenate([q, q], axis=1), k, v, jnp.concatenate([mask, mask], axis=1))
    np.testing.assert_allclose(step[:, 0], twice[:, 1], atol=1e-6)


@pytest.mark.slow  # ~12 s; every default sampler test already decodes through the unrolled model
def test_unrolled_model_is_the_scanned_one_layer_by_layer():
    """The decode loop's unrolled twin: pattern stacks (sliding/full, dense/MoE) cut layer by layer
    give the scanned model's logits, and an unscanned model is passed through."""
    cfg = tiny(n_layers=5, global_every=2, sliding_window=3,
               moe=MoEConfig(num_experts=4, experts_per_token=2, expert_d_ff=32, first_dense_layers=1, sparse_step=2))
    scanned = nnx.merge(*nnx.split(Decoder(cfg, rngs=nnx.Rngs(4))))  # as the sampler's programs build it
    graphdef, params = unrolled(*nnx.split(scanned))
    twin = nnx.merge(graphdef, params)
    assert not twin.cfg.scan_layers and len(jax.tree.leaves(params)) > len(jax.tree.leaves(nnx.state(scanned)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)))
    np.testing.assert_allclose(twin(tokens).logits, scanned(tokens).logits, atol=1e-5)
    plain = nnx.split(Decoder(CONFIGS["dense-window-unrolled"], rngs=nnx.Rngs(0)))
    assert unrolled(*plain)[1] is plain[1]
