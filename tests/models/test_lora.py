"""LoRA (models/lora.py): adapters on dense and MoE decoders, scanned and unrolled; training only the
adapters; merging them back; the merged export against `transformers`; expert parallelism."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base as base_config
from configs.sharding_rules import DEFAULT_RULES
from models import lora
from models.config import ConfigError, LoRAConfig, MoEConfig, config_from_dict, get_preset
from models.decoder import Decoder
from models.moe import MoEFeedForward
from models.sharding import create_sharded, make_mesh, sharding_context

RANK = 4
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 16))
BASE_ONLY = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def model_config(kind: str, scan: bool, **lora_fields):
    """A small dense (tiny) or MoE (mixtral-tiny: 8 experts, top-2, every layer MoE) decoder."""
    small = dict(n_layers=2, vocab_size=128, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, scan_layers=scan,
                 remat="none", dtype="float32")
    if kind == "moe":
        small["moe"] = dataclasses.replace(get_preset("mixtral-tiny").moe, expert_d_ff=48)
    cfg = get_preset("tiny" if kind == "dense" else "mixtral-tiny", **small)
    return cfg.replace(lora=LoRAConfig(rank=RANK, alpha=8.0, **lora_fields)) if lora_fields is not None else cfg


def randomize_adapters(model, seed: int, std: float = 0.1) -> None:
    """Gives every A and B random values, so that the adapters change the model."""
    key = jax.random.key(seed)
    for i, (_, _, adapter) in enumerate(lora.adapters(model)):
        for j, param in enumerate((adapter.a, adapter.b)):
            value = param.get_value()
            param.set_value(std * jax.random.normal(jax.random.fold_in(key, 2 * i + j), value.shape, value.dtype))


@nnx.jit
def _logits(model, tokens):
    return model(tokens).logits


def logits(model, tokens=TOKENS):
    return np.asarray(_logits(model, jnp.asarray(tokens)))


def flat(state) -> dict:
    return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


CASES = [("dense", True), ("dense", False), ("moe", True), ("moe", False)]
IDS = ["dense-scan", "dense-unrolled", "moe-scan", "moe-unrolled"]


def xent(model, tokens):
    out = model(tokens[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(xent, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize(("kind", "scan"), CASES, ids=IDS)
def test_adapters_train_alone_and_merge_back(kind, scan):
    cfg = model_config(kind, scan, dropout=0.1 if scan else 0.0)  # the scanned cases train through dropout
    base = Decoder(cfg.replace(lora=None), rngs=nnx.Rngs(0))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    # B = 0: same logits as the base, whose weights (same seed) are the adapted model's base weights.
    base_logits = logits(base)
    np.testing.assert_array_equal(logits(model), base_logits)
    base_params, base_before = flat(nnx.state(base, nnx.Param)), flat(nnx.state(model, BASE_ONLY))
    assert base_params.keys() == base_before.keys()
    for name in base_params:
        np.testing.assert_array_equal(base_before[name], base_params[name], err_msg=name)

    # Only the adapters are LoRAParams; every base weight is a plain Param.
    adapters_before = flat(nnx.state(model, nnx.LoRAParam))
    assert adapters_before and all(p.rsplit("/", 2)[-2].endswith("_lora") and p[-1] in "ab" for p in adapters_before)
    assert {type(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {nnx.Param, nnx.LoRAParam}
    expected = {"attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj"}
    expected |= {"mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"} if kind == "dense" else {
        "experts/gate", "experts/up", "experts/down"}
    assert {"/".join(p.split("/")[-3:-1])[: -len("_lora")] for p in adapters_before} == expected
    blocks = model.stacks["moe" if kind == "moe" else "dense"].blocks
    layers = (2,) if scan else ()
    block = blocks if scan else blocks[0]
    if kind == "moe":  # per-expert adapters: A [(L,) E, D, r], B [(L,) E, r, F]
        up = block.ffn.experts.up_lora
        assert up.a.shape == (*layers, 8, 64, RANK) and up.b.shape == (*layers, 8, RANK, 48)
        assert up.a.get_metadata()["out_sharding"] == ("layers",) * scan + ("experts", "embed", None)
    else:  # A [(L,) D, r], B [(L,) r, N, H]
        q = block.attn.q_proj_lora
        assert q.a.shape == (*layers, 64, RANK) and q.b.shape == (*layers, RANK, 4, cfg.head_dim)
    assert lora.lora_param_count(model) == sum(v.size for v in adapters_before.values())

    # Training with an optimizer over the LoRAParams: frozen weights get no optimizer state (Adam's
    # two moments are the adapters' size), stay bitwise equal, and the adapters all change.
    model.train()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    moment_sizes = sum(x.size for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if x.ndim)
    assert moment_sizes == 2 * lora.lora_param_count(model)
    losses = [float(train_step(model, optimizer, jnp.asarray(TOKENS))) for _ in range(3)]
    assert losses[-1] < losses[0]
    for name, value in flat(nnx.state(model, BASE_ONLY)).items():
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)
    adapters_after = flat(nnx.state(model, nnx.LoRAParam))
    for name, value in adapters_before.items():
        assert not np.array_equal(adapters_after[name], value), name

    # Merging reproduces the trained adapters' logits with no adapters left.
    model.eval()
    adapted_logits = logits(model)
    assert np.abs(adapted_logits - base_logits).max() > 1e-2
    merged = lora.merge_lora(model)
    assert merged.cfg.lora is None and merged.stacks[next(iter(merged.stacks))].cfg.lora is None
    assert not nnx.state(merged, nnx.LoRAParam) and flat(nnx.state(merged, nnx.Param)).keys() == base_params.keys()
    assert sum(v.size for v in flat(nnx.state(merged, nnx.Param)).values()) == cfg.param_count()
    np.testing.assert_allclose(logits(merged), adapted_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits(model), adapted_logits)  # merge_lora left `model` as it was


def test_dropout_only_in_training_mode_and_reseeded_from_one_key():
    cfg = model_config("moe", True, dropout=0.5, targets=("attn/q_proj", "experts/up"))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    randomize_adapters(model, seed=2, std=0.5)
    evaluated = logits(model)  # built in eval mode: no dropout
    np.testing.assert_allclose(evaluated, logits(lora.merge_lora(model)), rtol=1e-4, atol=1e-4)
    model.train()
    lora.reseed_dropout(model, jax.random.key(7))
    first = logits(model)
    lora.reseed_dropout(model, jax.random.key(7))
    np.testing.assert_array_equal(logits(model), first)
    lora.reseed_dropout(model, jax.random.key(8))
    assert np.abs(logits(model) - first).max() > 1e-3 and np.abs(first - evaluated).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(logits(model), evaluated)


def test_target_patterns_and_config_errors():
    dense = model_config("dense", True)
    only_values = Decoder(dense.replace(lora=LoRAConfig(targets="attn/v_proj, mlp/down_proj")), rngs=nnx.Rngs(0))
    assert {w for _, w, _ in lora.adapters(only_values)} == {"v_proj", "down_proj"}
    with pytest.raises(ConfigError, match=r"model\.lora\.targets: 'experts/up' matches no weight.*attn/q_proj"):
        Decoder(dense.replace(lora=LoRAConfig(targets=("attn/q_proj", "experts/up"))), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.lora\.targets: 'q_proj_typo'"):
        Decoder(dense.replace(lora=LoRAConfig(targets=("q_proj_typo",))), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank: must be an integer >= 1"):
        config_from_dict({"preset": "tiny", "lora": {"rank": 0}})
    with pytest.raises(ConfigError, match=r"lora\.targets: '\(' is not a regular expression"):
        LoRAConfig(targets="(").validate()
    # Command-line fields: all unset keeps LoRA off; one set turns it on with the other defaults.
    section = {k: None for k in base_config.LORA_FIELDS}
    assert config_from_dict({"preset": "tiny", "lora": section}).lora is None
    on = config_from_dict({"preset": "tiny", "lora": {**section, "rank": 16, "targets": "attn/q_proj,attn/v_proj"}})
    assert on.lora == LoRAConfig(rank=16, targets=("attn/q_proj", "attn/v_proj"))
    assert set(base_config.LORA_FIELDS) == {f.name for f in dataclasses.fields(LoRAConfig)}


# ---- expert parallelism ------------------------------------------------------------------------------


def expert_layer(impl: str, dropout: float = 0.0):
    moe = MoEConfig(num_experts=8, experts_per_token=3, expert_d_ff=12, impl=impl, capacity_factor=8 / 3)
    cfg = get_preset("tiny", d_model=16, n_heads=2, n_kv_heads=2, d_ff=24, n_layers=2, vocab_size=64, moe=moe)
    layer = MoEFeedForward(cfg, rngs=nnx.Rngs(0))
    lora.add_adapters(layer, LoRAConfig(rank=RANK, dropout=dropout, targets=("experts/(gate|up|down)",)), nnx.Rngs(1))
    randomize_adapters(layer, seed=3)
    return layer


X = jax.random.normal(jax.random.key(0), (8, 4, 16))


def adapter_grads(layer):
    def loss(layer, x):
        y, _ = layer(x)
        return jnp.sum(y * jnp.cos(x)), y

    (_, y), grads = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True))(layer, X)
    return y, flat(grads)


@pytest.mark.parametrize(("impl", "mesh_shape"), [("dropless", {"expert": 4, "tensor": 2}),
                                                  pytest.param("capacity", {"fsdp": 2, "expert": 4},
                                                               marks=pytest.mark.slow)],
                         ids=["dropless-expert4-tensor2", "capacity-fsdp2-expert4"])
def test_expert_adapters_under_expert_parallelism_equal_one_device(impl, mesh_shape):
    y_ref, grads_ref = adapter_grads(expert_layer(impl))
    assert set(grads_ref) == {f"experts/{w}_lora/{f}" for w in ("gate", "up", "down") for f in "ab"}
    mesh = make_mesh(mesh_shape)
    layer = create_sharded(lambda: expert_layer(impl), mesh, DEFAULT_RULES)
    assert layer.experts.up_lora.a.get_value().sharding.spec[0] == "expert"
    with sharding_context(mesh, DEFAULT_RULES):
        y, grads = adapter_grads(layer)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        for name, ref in grads_ref.items():
            np.testing.assert_allclose(grads[name], ref, rtol=1e-4, atol=1e-5, err_msg=name)
    dropping = create_sharded(lambda: expert_layer(impl, dropout=0.5), mesh, DEFAULT_RULES)
    dropping.train()  # dropout keys travel into the expert shards
    with sharding_context(mesh, DEFAULT_RULES):
        y_dropped, grads_dropped = adapter_grads(dropping)
    assert np.isfinite(y_dropped).all() and np.abs(y_dropped - y_ref).max() > 1e-3
    assert all(np.isfinite(g).all() for g in grads_dropped.values())


# ---- export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen2", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_merged_export_reloads_in_transformers_with_the_adapted_logits(tmp_path, model_type):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models.hf import load_hf_checkpoint, reference, save_hf_checkpoint  # noqa: PLC0415

    hf_model = reference.random_model(model_type)
    hf_model.save_pretrained(tmp_path / "base")
    tokens = np.random.default_rng(1).integers(0, reference.TINY_SHAPE["vocab_size"], size=(2, 12))
    adapted = load_hf_checkpoint(tmp_path / "base", dtype="float32", lora=LoRAConfig(rank=RANK, alpha=8.0))
    assert adapted.cfg.lora is not None and lora.adapters(adapted)
    np.testing.assert_allclose(logits(adapted, tokens), reference.logits(hf_model, tokens), rtol=1e-4, atol=1e-4)
    randomize_adapters(adapted, seed=4, std=0.2)
    adapted_logits = logits(adapted, tokens)
    assert np.abs(adapted_logits - reference.logits(hf_model, tokens)).max() > 1e-2
    with pytest.raises(ValueError, match="merge_lora"):
        save_hf_checkpoint(adapted, tmp_path / "unmerged")
    save_hf_checkpoint(lora.merge_lora(adapted), tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(reference.logits(reloaded, tokens), adapted_logits, rtol=1e-4, atol=1e-4)
