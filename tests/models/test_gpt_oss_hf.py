"""gpt-oss against transformers: a tiny random model (attention sinks, q/k/v/o biases, alternating
sliding/full layers, YaRN with an unrounded ramp, a biased router softmaxed over its top-k logits,
experts with biases and the clamped SwiGLU on HF's interleaved gate_up_proj) imports with logits equal
to 1e-4 in float32, scanned and unrolled, and exports back to the same logits; each gpt-oss feature
moves those logits; sinks agree across the attention kernels and the sampler's slot attention, with
gradients; greedy decoding through both KV caches equals decoding without one; expert parallelism
equals one device; the gpt-oss-20b preset has its published size."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.sharding_rules import DEFAULT_RULES
from models.attention import AttentionMask, blockwise_attention, chunked_attention, reference_attention
from models.config import PRESETS, ConfigError, MoEConfig, get_preset
from models.decoder import Decoder
from models.hf.registry import get_family, infer_family
from models.layers import Attention, slot_attention
from models.moe import MoEFeedForward
from models.sampler import Sampler
from models.sharding import create_sharded, make_mesh, sharding_context
from tests.models.test_layer_schedule import assert_layer_cache_decoding_is_the_full_forward
from tests.models.test_moe_parallel import forward_and_grads
from tests.models.test_moe_presets import abstract_counts
from tests.models.test_sampler import PROMPTS, greedy_without_cache
from tests.models.test_sampler import tiny as sampler_tiny

# ---- presets and config --------------------------------------------------------------------------------


def test_gpt_oss_20b_has_its_published_size():
    # gpt-oss model card (OpenAI 2025, table 1): 20.91B parameters, 3.61B active per token, the active
    # count including the unembedding and not the embedding (codelm's matmul parameters per token).
    cfg = PRESETS["gpt-oss-20b"]
    assert abs(cfg.param_count() / 1e9 - 20.91) / 20.91 < 0.005
    assert abs(cfg.matmul_params_per_token() / 1e9 - 3.61) / 3.61 < 0.005
    assert infer_family(cfg).model_type == "gpt_oss"


def test_param_count_formula_equals_the_built_model():
    cfg = PRESETS["gpt-oss-tiny"]
    total, active = abstract_counts(cfg)
    assert total == cfg.param_count()
    assert active == cfg.param_count(active=True)


def test_gpt_oss_fields_are_validated():
    with pytest.raises(ConfigError, match="attention_impl"):
        get_preset("gpt-oss-tiny", attention_impl="cudnn")
    with pytest.raises(ConfigError, match="attention_impl"):
        get_preset("gpt-oss-tiny", attention_impl="splash")
    with pytest.raises(ConfigError, match="mlp"):
        get_preset("tiny", mlp="clamped_swiglu")
    with pytest.raises(ConfigError, match="swiglu_limit"):
        get_preset("gpt-oss-tiny", swiglu_limit=0.0)
    with pytest.raises(ConfigError, match="attention_sinks"):
        get_preset("deepseek-v3-tiny", attention_sinks=True)


def test_other_families_refuse_gpt_oss_fields():
    cfg = PRESETS["gpt-oss-tiny"]
    with pytest.raises(ConfigError, match="mlp"):
        get_family("mixtral").hf_config(cfg)
    with pytest.raises(ConfigError, match="attention_sinks"):
        get_family("gpt_oss").hf_config(cfg.replace(attention_sinks=False))
    for field in ("router_bias", "expert_bias"):
        with pytest.raises(ConfigError, match=field):
            get_family("gpt_oss").hf_config(cfg.replace(moe=dataclasses.replace(cfg.moe, **{field: False})))


# ---- attention sinks in every kernel -------------------------------------------------------------------


def _sink_inputs():
    b, t, n, kv, h = 2, 13, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = jax.random.normal(keys[1], (b, t, kv, h)), jax.random.normal(keys[2], (b, t, kv, h))
    sinks = 2.0 * jax.random.normal(keys[3], (n,))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    segments = jnp.ones((b, t), jnp.int32)
    return q, k, v, sinks, positions, segments


@pytest.mark.slow
def test_sinks_agree_across_kernels_and_slot_attention():
    q, k, v, sinks, positions, segments = _sink_inputs()
    mask = AttentionMask(positions, positions, segments, segments, 5, causal=True, sinks=sinks)
    expected = reference_attention(q, k, v, mask)
    assert np.abs(expected - reference_attention(q, k, v, mask._replace(sinks=None))).max() > 0.1, "sinks must bite"
    np.testing.assert_allclose(chunked_attention(q, k, v, mask, query_chunk=4), expected, atol=1e-6)
    np.testing.assert_allclose(blockwise_attention(q, k, v, mask, 4, 4), expected, atol=1e-6)
    slots = (positions[:, None, :] <= positions[:, :, None]) & (positions[:, :, None] - positions[:, None, :] < 5)
    k_slots, v_slots = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(slot_attention(q, k_slots, v_slots, slots, 0.0, sinks), expected, atol=1e-6)
    last = slot_attention(q[:, -1:], k_slots, v_slots, slots[:, -1:], 0.0, sinks)  # the decode step's path
    np.testing.assert_allclose(last, expected[:, -1:], atol=1e-6)


@pytest.mark.slow
def test_blockwise_sink_gradients_equal_the_reference():
    q, k, v, sinks, positions, segments = _sink_inputs()
    cotangent = jax.random.normal(jax.random.key(5), q.shape)

    def grads(kernel):
        def loss(q, k, v, sinks):
            mask = AttentionMask(positions, positions, segments, segments, 5, causal=True, sinks=sinks)
            return jnp.sum(kernel(q, k, v, mask) * cotangent)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

    for name, got, expected in zip("q k v sinks".split(), grads(lambda *a: blockwise_attention(*a, 4, 4)),
                                   grads(reference_attention)):
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_attention_layer_sinks_start_at_zero_and_join_the_denominator():
    cfg = sampler_tiny(attention_sinks=True)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    assert attn.sinks.get_value().shape == (cfg.n_heads,) and not attn.sinks.get_value().any()
    plain = Attention(cfg.replace(attention_sinks=False), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 5, cfg.d_model))
    positions, segments = jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32)
    assert np.abs(attn(x, positions, segments)[0] - plain(x, positions, segments)[0]).max() > 1e-3


# ---- against transformers --------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.hf import load_hf_checkpoint, read_hf_config, reference, save_hf_checkpoint  # noqa: E402
from tests.models.hf_helpers import assert_minimal_config_reads_like_transformers, logits_diff  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, reference.TINY_SHAPE["vocab_size"], size=(2, 12))
# 4 layers (the sliding/full pair twice), 4 experts, top-2; a window of 4 in 12 tokens; a clamp the tiny
# model's N(0, 0.3) weights reach; YaRN over a 64-position pretraining context, unrounded as gpt-oss's.
OPTIONS = {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 4, "swiglu_limit": 1.5,
           "num_hidden_layers": 4,
           "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                               "original_max_position_embeddings": 64, "rope_theta": 150000.0}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint dir, transformers logits), built once."""
    model = reference.random_model("gpt_oss", **OPTIONS)
    directory = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(directory)
    return directory, reference.logits(model, TOKENS)


def max_diff(model, expected):
    return logits_diff(model(TOKENS).logits, expected)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_import_matches_transformers_logits(saved, scan_layers):
    directory, expected = saved
    model = load_hf_checkpoint(directory, scan_layers=scan_layers)
    assert [name for name, _ in model.ordered_stacks()] == ["moe_sliding-moe_full"]
    assert max_diff(model, expected) < 1e-4


def _with_sinks(model, value):
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention):
            module.sinks.set_value(jnp.full_like(module.sinks.get_value(), value))
    return model


@pytest.mark.slow
def test_each_gpt_oss_feature_changes_the_logits(saved):
    """The parity above would hold for a feature codelm ignored only if it changed nothing: each, turned
    off on import, moves the logits far more than the tolerance."""
    directory, expected = saved
    for off in [dict(swiglu_limit=1e4), dict(layer_types=()), dict(rope_scaling={"kind": "none"})]:
        assert max_diff(load_hf_checkpoint(directory, **off), expected) > 1e-2, off
    assert max_diff(_with_sinks(load_hf_checkpoint(directory), -1e4), expected) > 1e-2, "sinks"


@pytest.mark.slow
def test_export_round_trip_through_transformers(saved, tmp_path):
    directory, expected = saved
    save_hf_checkpoint(load_hf_checkpoint(directory), tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "GptOssForCausalLM"
    assert reloaded.config.rope_parameters["truncate"] is False
    np.testing.assert_array_less(np.abs(reference.logits(reloaded, TOKENS) - expected).max(), 1e-4)


def test_missing_config_fields_take_transformers_defaults(tmp_path):
    ours = assert_minimal_config_reads_like_transformers("gpt_oss", tmp_path, vocab_size=96, hidden_size=64,
                                                         num_hidden_layers=4, num_attention_heads=16, intermediate_size=96)
    assert ours.rope_scaling.kind == "yarn" and ours.rope_scaling.truncate is False
    assert [ours.layer_window(i) for i in range(4)] == [128, 0, 128, 0]


def test_preset_survives_config_round_trip(tmp_path):
    cfg = PRESETS["gpt-oss-20b"]
    config = get_family("gpt_oss").hf_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(config))
    transformers.AutoConfig.for_model(**config)  # transformers' strict config class accepts it
    back, _ = read_hf_config(tmp_path, name=cfg.name, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             scan_layers=cfg.scan_layers, remat=cfg.remat, init_std=cfg.init_std)
    assert back.replace(layer_types=(), global_every=cfg.global_every) == cfg


# ---- decoding with the KV caches, expert parallelism ---------------------------------------------------

# The sampler tests' tiny model with gpt-oss's layers; a clamp its activations reach.
DECODER = sampler_tiny(n_layers=4, head_dim=32, sliding_window=4, global_every=2, mlp="clamped_swiglu", qkv_bias=True,
                       out_bias=True, attention_sinks=True, swiglu_limit=1.0,
                       moe=MoEConfig(num_experts=4, experts_per_token=2, expert_d_ff=64, router_bias=True, expert_bias=True))


def _randomise_zero_inits(model, seed=0):
    """Biases and sinks start at zero; random ones make the checks below see them."""
    state = nnx.state(model, nnx.Param)
    for i, (path, variable) in enumerate(nnx.to_flat_state(state)):
        if path[-1] in ("sinks", "logit_bias") or path[-1].endswith("_bias"):
            value = variable.get_value()
            noise = 0.5 * jax.random.normal(jax.random.key(seed + i), value.shape, value.dtype)
            variable.set_value(jax.device_put(noise, value.sharding))
    return model


@pytest.mark.slow
def test_greedy_decoding_with_both_caches_equals_decoding_without():
    model = _randomise_zero_inits(Decoder(DECODER, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(TOKENS[:, :10] % DECODER.vocab_size)
    assert_layer_cache_decoding_is_the_full_forward(model, tokens)
    out = Sampler(model).generate(PROMPTS, max_new_tokens=8)
    for prompt, generated in zip(PROMPTS, out.tokens):
        assert generated == greedy_without_cache(model, prompt, 8)


def _expert_config(impl):
    # test_moe_parallel's shapes (K = 3 > L = 2 experts per shard) with gpt-oss's experts; 2F = 24 splits
    # into gate/up pairs over tensor = 2.
    moe = MoEConfig(num_experts=8, experts_per_token=3, expert_d_ff=12, router_bias=True, expert_bias=True, impl=impl,
                    capacity_factor=8 / 3)
    return get_preset("tiny", d_model=16, n_heads=2, n_kv_heads=2, d_ff=24, n_layers=2, vocab_size=64, moe=moe,
                      mlp="clamped_swiglu", swiglu_limit=1.0)


@pytest.mark.slow
@pytest.mark.parametrize(("impl", "mesh_shape"), [("dropless", {"data": 2, "expert": 4}),
                                                  ("dropless", {"expert": 4, "tensor": 2}),
                                                  ("capacity", {"fsdp": 2, "expert": 4})],
                         ids=["dropless-data2-expert4", "dropless-expert4-tensor2", "capacity-fsdp2-expert4"])
def test_expert_parallel_gpt_oss_experts_equal_unsharded(impl, mesh_shape):
    cfg = _expert_config(impl)
    y_ref, aux_ref, grads_ref = forward_and_grads(_randomise_zero_inits(MoEFeedForward(cfg, rngs=nnx.Rngs(0))))
    mesh = make_mesh(mesh_shape)
    layer = _randomise_zero_inits(create_sharded(lambda: MoEFeedForward(cfg, rngs=nnx.Rngs(0)), mesh, DEFAULT_RULES))
    with sharding_context(mesh, DEFAULT_RULES):
        y, aux, grads = forward_and_grads(layer)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(grads_ref), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
