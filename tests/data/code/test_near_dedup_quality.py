"""Near-dedup quality: codelm's clusters (star edges of LSH buckets + connected components, the
rule the local driver and the Beam pipeline share) against datasketch's MinHashLSH on the same
shingles, permutations and threshold, and its pair decisions against exact Jaccard similarity."""

from __future__ import annotations

import itertools
import sysconfig
from pathlib import Path

import datasketch
import numpy as np
import pytest

from data.code import dedup, minhash
from tests.data.code.test_minhash import reference_shingles

STDLIB = Path(sysconfig.get_paths()["stdlib"])
THRESHOLD = 0.7
HASHER = minhash.MinHasher(num_perm=256, ngram=5, seed=1)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Standard-library modules, then variants of 40 of them with 2-40% of their lines deleted
    (exact Jaccard to the original from about 0.3 to 0.95, so many pairs lie near the threshold)."""
    rng = np.random.default_rng(0)
    originals = [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("[a-p]*.py")) if 3_000 < p.stat().st_size < 30_000][:150]
    variants = []
    for text in originals[:40]:
        lines = text.splitlines(keepends=True)
        for fraction in (0.02, 0.08, 0.15, 0.25, 0.4):
            keep = rng.random(len(lines)) >= fraction
            variants.append("".join(line for line, kept in zip(lines, keep) if kept))
    order = rng.permutation(len(originals) + len(variants))  # variants may come before their original
    return [(originals + variants)[i] for i in order]


def cluster_pairs(labels: list[int]) -> set[tuple[int, int]]:
    """Pairs of documents with the same cluster label."""
    members: dict[int, list[int]] = {}
    for document, label in enumerate(labels):
        members.setdefault(label, []).append(document)
    return {pair for group in members.values() for pair in itertools.combinations(group, 2)}


def test_clusters_match_datasketch_minhash_lsh(documents: list[str]) -> None:
    shingles = HASHER.shingle_hashes(documents)
    signatures = HASHER.signatures_of_hashes(shingles)
    bands, rows = minhash.lsh_parameters(THRESHOLD, 256)
    keys = minhash.band_keys(signatures, bands, rows)
    graph = dedup.NearDuplicateGraph(bands, rows, THRESHOLD)
    for document in range(len(documents)):
        graph.add(document, keys[document], signatures[document])
    ours = cluster_pairs([graph.representative(document) for document in range(len(documents))])

    # datasketch: every LSH candidate pair verified by its own Jaccard estimate, then union-find.
    a, b = HASHER.permutations
    sketches = []
    lsh = datasketch.MinHashLSH(threshold=THRESHOLD, num_perm=256)
    assert (lsh.b, lsh.r) == (bands, rows)
    for document in range(len(documents)):
        sketch = datasketch.MinHash(num_perm=256, scheme="affine32", permutations=(a, b), hashfunc=int)
        sketch.update_batch(shingles.document(document).tolist())
        lsh.insert(document, sketch)
        sketches.append(sketch)
    parent = list(range(len(documents)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for document, sketch in enumerate(sketches):
        for other in lsh.query(sketch):
            if other != document and sketch.jaccard(sketches[other]) >= THRESHOLD:
                low, high = sorted((find(document), find(other)))
                parent[high] = low
    reference = cluster_pairs([find(document) for document in range(len(documents))])

    assert len(reference) > 100  # the corpus has many duplicate pairs
    common = len(ours & reference)
    precision, recall = common / len(ours), common / len(reference)
    assert precision >= 0.99 and recall >= 0.99, (precision, recall, len(ours), len(reference))


def test_pair_decisions_against_exact_jaccard(documents: list[str]) -> None:
    """All pairs of a sample of 100 documents: a pair is a near duplicate for codelm when it shares
    an LSH band and its signatures agree on >= 0.7; the truth is exact Jaccard >= 0.7 of the
    shingle sets. MinHash estimates err by about 0.03 at 256 permutations, so the errors must all
    lie near the threshold, where LSH's collision probability falls off."""
    sample = documents[:100]
    shingle_sets = [reference_shingles(text) for text in sample]
    signatures = HASHER.signatures(sample)
    bands, rows = minhash.lsh_parameters(THRESHOLD, 256)
    keys = minhash.band_keys(signatures, bands, rows)
    predicted, actual, similarity = set(), set(), {}
    for i, j in itertools.combinations(range(len(sample)), 2):
        union = len(shingle_sets[i] | shingle_sets[j])
        similarity[i, j] = len(shingle_sets[i] & shingle_sets[j]) / union if union else 1.0
        if similarity[i, j] >= THRESHOLD:
            actual.add((i, j))
        if (keys[i] == keys[j]).any() and dedup.is_near_duplicate(signatures[i], signatures[j], THRESHOLD, True):
            predicted.add((i, j))
    assert len(actual) >= 20
    common = len(predicted & actual)
    precision, recall = common / len(predicted), common / len(actual)
    errors = sorted(round(similarity[pair], 3) for pair in predicted ^ actual)
    # LSH with (25, 10) catches a pair of similarity 0.7 with probability 0.51, of 0.8 with 0.94.
    assert precision >= 0.95 and recall >= 0.8, (precision, recall, errors)
    assert all(abs(value - THRESHOLD) < 0.1 for value in errors), errors
