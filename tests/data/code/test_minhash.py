"""MinHash and deduplication, against datasketch and exact Jaccard similarities."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import datasketch
import numpy as np
import pytest

from data.code import dedup, hashing, minhash

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HASHER = minhash.MinHasher(num_perm=256, ngram=5, seed=1)


def reference_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word 5-grams as The Stack's near-dedup defines them, from a plain regex split."""
    tokens = [t for t in re.split(r"[^A-Za-z_0-9]", text) if t]
    return {tuple(tokens[i : i + n]) for i in range(max(len(tokens) - n + 1, 1))} if tokens else set()


def exact_jaccard(a: str, b: str) -> float:
    sa, sb = reference_shingles(a), reference_shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_tokens_and_shingles_match_the_regex_definition() -> None:
    texts = ["def f(x):\n    return x_1 + 2", "", "émoji 🙂 ok_then", "a b c", "tiny"]
    tokens = hashing.word_token_hashes(texts)
    shingles = HASHER.shingle_hashes(texts)
    for i, text in enumerate(texts):
        words = re.findall(r"[A-Za-z0-9_]+", text)
        assert tokens.counts()[i] == len(words)
        assert len(set(shingles.document(i).tolist())) == len(reference_shingles(text))
    # Equal words hash equally wherever they occur.
    again = hashing.word_token_hashes(["return", "x return"])
    assert again.hashes[0] == again.hashes[2]


def test_signatures_are_bit_identical_to_datasketch_affine32() -> None:
    texts = [path.read_text(encoding="utf-8") for path in sorted(STDLIB.glob("[a-c]*.py"))[:12]]
    signatures = HASHER.signatures(texts)
    shingles = HASHER.shingle_hashes(texts)
    a, b = HASHER.permutations
    for i in range(len(texts)):
        reference = datasketch.MinHash(num_perm=256, scheme="affine32", permutations=(a, b), hashfunc=int)
        reference.update_batch(shingles.document(i).tolist())
        np.testing.assert_array_equal(reference.hashvalues, signatures[i])


def test_batching_does_not_change_signatures() -> None:
    # Large documents span several [shingles, permutations] blocks; empty ones have no shingles.
    texts = [path.read_text(encoding="utf-8") for path in sorted(STDLIB.glob("[d-f]*.py"))[:6]]
    texts = texts[:2] + ["", "   "] + texts[2:] + ["short text"]
    together = HASHER.signatures(texts)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(together[i], HASHER.signatures([text])[0])
    assert (together[2] == minhash.EMPTY_HASH).all() and (together[3] == minhash.EMPTY_HASH).all()


VOCABULARY = np.array([f"w{i}" for i in range(5000)])


def random_pair(rng: np.random.Generator) -> tuple[str, str]:
    """Two token streams sharing a random fraction of their 5-grams."""
    base = rng.choice(VOCABULARY, size=int(rng.integers(100, 400)))
    other = base.copy()
    edits = rng.choice(len(other), size=int(rng.integers(0, len(base) // 4)), replace=False)
    other[edits] = rng.choice(VOCABULARY, size=len(edits))
    return " ".join(base), " ".join(other)


def test_estimated_jaccard_is_within_0_05_of_exact_on_random_pairs() -> None:
    rng = np.random.default_rng(0)
    pairs = [random_pair(rng) for _ in range(300)]
    signatures = HASHER.signatures([text for pair in pairs for text in pair])
    exact = np.array([exact_jaccard(a, b) for a, b in pairs])
    estimated = np.array([minhash.estimate_jaccard(signatures[2 * i], signatures[2 * i + 1]) for i in range(len(pairs))])
    errors = np.abs(estimated - exact)
    assert exact.min() < 0.2 and exact.max() > 0.9  # the pairs cover the similarity range
    # The estimate is a mean of 256 Bernoulli(J) draws: standard error sqrt(J(1-J)/256) <= 0.031.
    # So the mean absolute error is at most 0.025, and at most ~11% of pairs (all at J = 0.5)
    # may miss 0.05 by chance.
    assert errors.mean() <= 0.025
    assert np.mean(errors <= 0.05) >= 0.9
    assert errors.max() < 5 * 0.031
    # Calibration: squared errors in units of the binomial variance average to ~1.
    inside = (exact > 0) & (exact < 1)
    z_squared = (estimated - exact)[inside] ** 2 / (exact * (1 - exact) / 256)[inside]
    assert 0.75 < z_squared.mean() < 1.3


@pytest.mark.parametrize("threshold,num_perm", [(0.7, 256), (0.5, 128), (0.8, 256), (0.9, 64)])
def test_lsh_parameters_match_datasketch(threshold: float, num_perm: int) -> None:
    reference = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert minhash.lsh_parameters(threshold, num_perm) == (reference.b, reference.r)


def small_edits(text: str, rng: np.random.Generator) -> list[str]:
    lines = text.splitlines(keepends=True)
    cut = int(rng.integers(len(lines) // 4, 3 * len(lines) // 4))
    words = sorted(set(re.findall(r"\b[a-z_]{6,}\b", text)))
    renamed = str(words[int(rng.integers(len(words)))])
    return [
        "".join(lines[:cut] + lines[cut + 1 :]),  # one line deleted
        "# Copyright (c) someone else\n" + text,  # a header added
        text.replace("    ", "\t"),  # re-indented
        re.sub(rf"\b{renamed}\b", renamed + "_v2", text, count=2),  # an identifier renamed twice
    ]


def test_near_duplicates_are_found_and_distinct_files_kept() -> None:
    rng = np.random.default_rng(1)
    originals = [path.read_text(encoding="utf-8") for path in sorted(STDLIB.glob("[g-s]*.py")) if 2000 < path.stat().st_size < 60000][:40]
    variants = [(i, edited) for i, text in enumerate(originals[:10]) for edited in small_edits(text, rng)]
    bands, rows = minhash.lsh_parameters(0.7, 256)
    near = dedup.NearDuplicateGraph(bands, rows, threshold=0.7)
    signatures = HASHER.signatures(originals + [text for _, text in variants])
    keys = minhash.band_keys(signatures, bands, rows)
    for row in range(len(signatures)):
        near.add(row, keys[row], signatures[row])
    assert [near.representative(i) for i in range(len(originals))] == list(range(len(originals)))  # distinct modules all kept
    assert [near.representative(len(originals) + j) for j in range(len(variants))] == [original for original, _ in variants]


def test_band_keys_collide_exactly_when_bands_agree() -> None:
    signatures = np.arange(2 * 24, dtype=np.uint32).reshape(2, 24)
    signatures[1, :4] = signatures[0, :4]  # first band equal, others differ
    keys = minhash.band_keys(signatures, bands=6, rows=4)
    assert keys[0, 0] == keys[1, 0] and (keys[0, 1:] != keys[1, 1:]).all()
    same_values = np.tile(np.arange(4, dtype=np.uint32), (1, 2))  # two bands with equal values
    keys = minhash.band_keys(same_values, bands=2, rows=4)
    assert keys[0, 0] != keys[0, 1]  # bands are distinguished even for equal values


def test_exact_deduplication_by_content_hash() -> None:
    exact = dedup.ExactDeduplicator()
    texts = ["x = 1\n", "x = 1\n", "x = 1 \n", "x = 1\n"]
    assert [exact.is_duplicate(dedup.content_hash(t)) for t in texts] == [False, True, False, True]
    assert exact.duplicates == 2


def test_unverified_lsh_flags_any_band_collision() -> None:
    first = np.array([1, 2, 3, 4], dtype=np.uint32)
    second = np.array([1, 2, 9, 9], dtype=np.uint32)  # estimated Jaccard 0.5, one band shared
    keys = minhash.band_keys(np.stack([first, second]), 2, 2)
    for verify, expected in ((False, 0), (True, 1)):
        near = dedup.NearDuplicateGraph(bands=2, rows=2, threshold=0.9, verify=verify)
        near.add(0, keys[0], first)
        near.add(1, keys[1], second)
        assert (near.representative(0), near.representative(1)) == (0, expected)


def test_near_duplicate_clusters_are_connected_components() -> None:
    """Document 2 shares a band with 0 and another with 1: all three form one cluster kept as 0,
    though 1 matched nothing when it was added (a greedy first-match rule would keep 1)."""
    signatures = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 7, 8], [9, 9, 9, 9]], dtype=np.uint32)
    keys = minhash.band_keys(signatures, 2, 2)
    near = dedup.NearDuplicateGraph(bands=2, rows=2, threshold=0.5, verify=True)
    for document in (0, 1, 2, 3):
        near.add(document, keys[document], signatures[document])
    assert [near.representative(document) for document in range(4)] == [0, 0, 0, 3]


def test_selecting_documents_of_hashed_sequences() -> None:
    texts = ["a b c", "", "d e", "f g h i"]
    tokens = hashing.word_token_hashes(texts)
    picked = tokens.select([3, 1, 0])
    expected = hashing.word_token_hashes([texts[3], texts[1], texts[0]])
    np.testing.assert_array_equal(picked.hashes, expected.hashes)
    np.testing.assert_array_equal(picked.offsets, expected.offsets)
    np.testing.assert_array_equal(picked.numeric, expected.numeric)
