"""SFT against references no one here wrote, on a tiny random Qwen2 model imported from transformers:
the loss of one packed batch of chat conversations equals transformers' loss with labels -100 on
everything but the assistant tokens, and three AdamW steps give the losses of three
`torch.optim.AdamW` steps on the transformers model."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from configs.sharding_rules import DEFAULT_RULES  # noqa: E402
from data.hf_tokenizer import HFTokenizer  # noqa: E402
from data.sft import SFTDataConfig, build_sft_iterator  # noqa: E402
from models.hf import load_hf_checkpoint, reference  # noqa: E402
from models.sharding import make_mesh  # noqa: E402
from tests.models.test_hf_tokenizer import byte_level_tokenizer  # noqa: E402
from train.optimizer import OptimConfig, make_optimizer  # noqa: E402
from train.state import init_train_state  # noqa: E402
from train.step import make_train_step, next_token_loss  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY = 3e-3, (0.9, 0.95), 1e-8, 0.1

CONVERSATIONS = [
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
     {"role": "user", "content": "Now subtract."}, {"role": "assistant", "content": "def sub(a, b):\n    return a - b"}],
    [{"role": "user", "content": "Reverse a list."}, {"role": "assistant", "content": "def rev(xs):\n    return xs[::-1]"}],
    [{"role": "user", "content": "Is n even?"}, {"role": "assistant", "content": "def even(n):\n    return n % 2 == 0"}],
    [{"role": "user", "content": "Square it."}, {"role": "assistant", "content": "def sq(x):\n    return x * x"},
     {"role": "user", "content": "Cube it."}, {"role": "assistant", "content": "def cube(x):\n    return x ** 3"}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = byte_level_tokenizer(tmp_path_factory.mktemp("qwen2_sft"))
    vocab = HFTokenizer(directory).vocab_size
    reference.random_model("qwen2", vocab_size=vocab).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def batch(checkpoint, tmp_path_factory):
    """One packed SFT batch [2, 256] holding the four conversations."""
    path = tmp_path_factory.mktemp("chats") / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    data = base.get_config().data
    data.sources = {"chat": base.source("jsonl", {"train": str(path)})}
    data.tokenizer_path = str(checkpoint)
    data.seq_len, data.batch_size, data.chunk_shuffle_window, data.fim.fim_rate = 256, 2, 0, 0.0
    iterator = build_sft_iterator(data, SFTDataConfig(), HFTokenizer(checkpoint), split="train",
                                  process_index=0, process_count=1)
    rows = next(iterator)
    assert rows["segment_ids"].max() >= 2  # several conversations share a row
    return rows


def segments_as_hf_batch(rows):
    """Each packed conversation as its own padded sequence, with labels -100 off the trained tokens."""
    sequences = []
    for r in range(rows["inputs"].shape[0]):
        for segment in np.unique(rows["segment_ids"][r]):
            if segment == 0:
                continue
            where = rows["segment_ids"][r] == segment
            tokens = np.append(rows["inputs"][r][where], rows["targets"][r][where][-1])
            labels = np.append(-100, np.where(rows["loss_mask"][r][where] > 0, rows["targets"][r][where], -100))
            sequences.append((tokens, labels))
    width = max(len(t) for t, _ in sequences)
    input_ids = np.zeros((len(sequences), width), np.int64)
    labels = np.full((len(sequences), width), -100, np.int64)
    attention = np.zeros((len(sequences), width), np.int64)
    for i, (tokens, label) in enumerate(sequences):
        input_ids[i, : len(tokens)], labels[i, : len(tokens)], attention[i, : len(tokens)] = tokens, label, 1
    return {name: torch.as_tensor(array) for name, array in
            (("input_ids", input_ids), ("labels", labels), ("attention_mask", attention))}


def codelm_losses(checkpoint, rows, steps):
    model = load_hf_checkpoint(checkpoint, dtype="float32", remat="none")
    optim = OptimConfig(lr=LR, schedule="constant", warmup_steps=0, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                        weight_decay=WEIGHT_DECAY, clip_norm=0.0)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, state, tx, _ = init_train_state(None, lambda p: make_optimizer(optim, 100, p)[0], mesh, DEFAULT_RULES,
                                              pretrained=model)
    step = jax.jit(make_train_step(graphdef, tx, next_token_loss))
    batch = {name: np.asarray(array)[None] for name, array in rows.items()}  # one micro-batch
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def torch_losses(checkpoint, rows, steps):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.train()
    # codelm's AdamW decays matrices only: not norms, biases or the input embedding (train/optimizer.py).
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or n.endswith("bias") or "embed_tokens" in n]
    decay = [p for n, p in model.named_parameters() if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    batch = segments_as_hf_batch(rows)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_sft_loss_equals_transformers_with_prompt_labels_ignored(checkpoint, batch):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = float(model(**segments_as_hf_batch(batch)).loss)
    codelm_model = load_hf_checkpoint(checkpoint, dtype="float32", remat="none")
    got = next_token_loss(codelm_model, {k: np.asarray(v) for k, v in batch.items()})
    assert float(got.total / got.weight) == pytest.approx(expected, rel=1e-5)
    assert float(got.weight) == float(batch["loss_mask"].sum())


def test_three_adamw_steps_match_torch(checkpoint, batch):
    got, want = codelm_losses(checkpoint, batch, 3), torch_losses(checkpoint, batch, 3)
    assert got[2] < got[0]  # it learns
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_frozen_weights_are_not_in_the_optimizer_state(checkpoint):
    model = load_hf_checkpoint(checkpoint, dtype="float32", remat="none")
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    only_norms = nnx.PathContains("final_norm")
    _, state, _, _ = init_train_state(None, lambda p: make_optimizer(OptimConfig(), 10, p)[0], mesh, DEFAULT_RULES,
                                      trainable=only_norms, pretrained=model)
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert trainable == model.cfg.d_model and moments == 2 * trainable
