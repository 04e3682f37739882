"""Pretraining setup: FIM from config reaches the batches, the model's vocabulary fits the tokenizer,
the n-gram baselines are what direct counting gives."""

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

from configs.schema import ConfigError
from tests.train.conftest import small_run
from train.pretrain import _split_pairs, data_iterator, fit_vocab, ngram_baselines


def test_fim_rate_from_config_reaches_the_batches(corpus_dir, tokenizer, tmp_path):
    run = small_run(corpus_dir, tmp_path)
    for rate, expect_fim in ((0.0, False), (1.0, True)):
        data = dataclasses.replace(run.data, fim=dataclasses.replace(run.data.fim, fim_rate=rate))
        batches = data_iterator(data, tokenizer, "train")
        inputs = np.concatenate([next(batches)["inputs"] for _ in range(20)])
        has_fim = np.isin(inputs, [tokenizer.fim_prefix_id, tokenizer.fim_middle_id, tokenizer.fim_suffix_id])
        assert has_fim.any() == expect_fim


def test_vocab_fits_the_tokenizer(corpus_dir, tokenizer, tmp_path):
    run = small_run(corpus_dir, tmp_path)
    fitted = fit_vocab(run.model.replace(vocab_size=32000), False, tokenizer)
    assert fitted.vocab_size == 512 and fitted.vocab_size % 128 == 0
    with pytest.raises(ConfigError, match="model.vocab_size: 256 is smaller than the tokenizer's 512"):
        fit_vocab(run.model.replace(vocab_size=256), True, tokenizer)


def test_ngram_baselines_match_direct_counting(corpus_dir, tokenizer, tmp_path):
    run = small_run(corpus_dir, tmp_path)
    got = ngram_baselines(run.data, tokenizer, bigram_weight=0.8)
    train = [tuple(p) for p in _split_pairs(run.data, tokenizer, "train").tolist()]
    held_out = [tuple(p) for p in _split_pairs(run.data, tokenizer, "validation").tolist()]
    unigram, bigram, context = Counter(b for _, b in train), Counter(train), Counter(a for a, _ in train)
    total, vocab = sum(unigram.values()), tokenizer.vocab_size
    p_uni = lambda b: (unigram[b] + 1) / (total + vocab)  # noqa: E731
    p_bi = lambda a, b: 0.8 * (bigram[(a, b)] / context[a] if context[a] else 0.0) + 0.2 * p_uni(b)  # noqa: E731
    assert got["unigram_cross_entropy_heldout"] == pytest.approx(-sum(math.log(p_uni(b)) for _, b in held_out) / len(held_out))
    assert got["bigram_cross_entropy_heldout"] == pytest.approx(-sum(math.log(p_bi(a, b)) for a, b in held_out) / len(held_out))
    assert got["unigram_entropy_train"] == pytest.approx(-sum(n / total * math.log(n / total) for n in unigram.values()))
