"""Multi-head latent attention in the decoder: the compressed cache holds kv_lora_rank + qk_rope_head_dim
numbers per token and layer, decoding through it (absorbed projections, never expanding keys or values)
gives the tokens and log-probabilities of full forward passes, the LayerCache path equals a full forward,
and the parameter formula counts what is built."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import MLAConfig, MoEConfig, get_preset
from models.decoder import Decoder, count_params
from models.mla import MultiHeadLatentAttention
from models.sampler import Sampler
from tests.models.test_layer_schedule import assert_layer_cache_decoding_is_the_full_forward
from tests.models.test_sampler import PROMPTS, full_forward_logprobs, greedy_without_cache

MLA = MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def tiny(**overrides):
    fields = dict(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=4, d_ff=128, n_layers=3, dtype="float32",
                  init_std=0.2, max_seq_len=256, mla=MLA,
                  moe=MoEConfig(num_experts=8, experts_per_token=2, expert_d_ff=32, num_shared_experts=1,
                                first_dense_layers=1, router="sigmoid", num_groups=4, topk_groups=2))
    return get_preset("tiny", **{**fields, **overrides})


def test_the_cache_holds_the_latent_and_rope_key_only():
    model = nnx.eval_shape(lambda: Decoder(tiny(), rngs=nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_kv_cache(batch=2, length=32, dtype="float32"))
    assert {name: (c.k.shape, c.v.shape) for name, c in cache.items()} == {
        "dense": ((1, 2, 1, 32, 16), (1, 2, 1, 32, 8)), "moe": ((2, 2, 1, 32, 16), (2, 2, 1, 32, 8))}
    assert isinstance(model.stacks["moe"].blocks.attn, MultiHeadLatentAttention)


@pytest.mark.parametrize("overrides", [
    pytest.param({}, marks=pytest.mark.slow),  # ~13 s of compilation: make test-slow
    pytest.param({"mla": MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
                  "scan_layers": False}, marks=pytest.mark.slow),
], ids=["q_lora-scanned", "full_rank_q-unrolled"])
def test_greedy_decoding_through_the_compressed_cache_equals_full_forwards(overrides):
    model = Decoder(tiny(**overrides), rngs=nnx.Rngs(1))
    out = Sampler(model).generate(PROMPTS, max_new_tokens=8)
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        assert tokens == greedy_without_cache(model, prompt, 8)
        np.testing.assert_allclose(logprobs, full_forward_logprobs(model, prompt, tokens), atol=5e-5)


@pytest.mark.slow
def test_layer_cache_path_equals_full_forward():
    model = Decoder(tiny(sliding_window=4, global_every=3), rngs=nnx.Rngs(2))
    assert_layer_cache_decoding_is_the_full_forward(model, jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 10))))


@pytest.mark.parametrize("mla", [MLA, MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                                v_head_dim=16)], ids=["q_lora", "full_rank_q"])
def test_param_count_formula_equals_the_built_model(mla):
    cfg = tiny(mla=mla)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    assert count_params(model) == cfg.param_count()


def test_mla_gradients_flow_to_every_projection():
    model = Decoder(tiny(moe=None, n_layers=1), rngs=nnx.Rngs(3))
    grads = nnx.grad(lambda m: jnp.mean(m(jnp.arange(16).reshape(2, 8)).logits ** 2))(model)
    attn = grads.stacks["dense"].blocks.attn
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj"):
        assert float(jnp.abs(attn[name][...]).max()) > 0, name
    assert jax.tree.leaves(attn["kv_norm"])  # the latent's norm is trained too


# ---- presets ---------------------------------------------------------------------------------------

# (total, active) in billions as published. DeepSeek-Coder-V2-Lite: model page 15.7B, model card 2.4B
# active; DeepSeek-V3 report: 671B total, 37B activated. DeepSeek's active figures leave out the input
# embedding (a lookup), i.e. they are `matmul_params_per_token`; compared within one unit of the last
# published digit, totals within 0.5%.
PUBLISHED = {"deepseek-coder-v2-lite": (15.7, 2.4, 0.1), "deepseek-v3": (671.0, 37.0, 1.0)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_deepseek_param_counts_match_published(name):
    total, active, unit = PUBLISHED[name]
    cfg = get_preset(name)
    assert abs(cfg.param_count() / 1e9 - total) / total < 0.005, cfg.param_count()
    assert abs(cfg.matmul_params_per_token() / 1e9 - active) < unit, cfg.matmul_params_per_token()
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    assert count_params(model) == cfg.param_count()


@pytest.mark.slow
def test_expert_parallel_mla_moe_decoder_equals_unsharded():
    """deepseek-v3-tiny (narrowed) with experts split 4 ways and fsdp 2: logits, aux and gradients equal
    one device's."""
    from configs.sharding_rules import DEFAULT_RULES
    from models.sharding import create_sharded, make_mesh, sharding_context

    cfg = get_preset("deepseek-v3-tiny", vocab_size=128, d_model=64, n_layers=2, dtype="float32", remat="none",
                     mla=MLA, moe=dataclasses.replace(get_preset("deepseek-v3-tiny").moe, num_experts=8, expert_d_ff=32))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 128, size=(8, 8)))

    def loss(model):
        out = model(tokens)
        return jnp.mean(out.logits ** 2) + sum(jnp.sum(v) for k, v in out.aux.items() if "/loss_" in k), out

    def run(model):
        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return out.logits, out.aux, nnx.to_pure_dict(grads)

    make = lambda: Decoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    ref = nnx.jit(run)(make())
    mesh = make_mesh({"expert": 4, "fsdp": 2})
    model = create_sharded(make, mesh, DEFAULT_RULES)
    assert model.stacks["moe"].blocks.ffn.experts.up.get_value().sharding.spec[1] == "expert"
    with sharding_context(mesh, DEFAULT_RULES):
        got = nnx.jit(run)(model)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got[1], ref[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[2], ref[2])


@pytest.mark.slow
def test_lora_adapts_the_latent_projections():
    from models.config import LoRAConfig
    from models.lora import lora_param_count

    base = tiny(moe=None, n_layers=1)
    lora = LoRAConfig(rank=4, targets=(r"attn/(q_a|q_b|kv_a|o)_proj",))
    adapted = Decoder(base.replace(lora=lora), rngs=nnx.Rngs(5))
    plain = Decoder(base, rngs=nnx.Rngs(5))
    tokens = jnp.arange(16).reshape(2, 8)
    np.testing.assert_allclose(adapted(tokens).logits, plain(tokens).logits, atol=1e-6)  # B = 0 at init
    m, d, n = MLA, base.d_model, base.n_heads
    assert lora_param_count(adapted) == 4 * (d + m.q_lora_rank + m.q_lora_rank + n * m.qk_head_dim + d
                                             + m.kv_lora_rank + m.qk_rope_head_dim + n * m.v_head_dim + d)
