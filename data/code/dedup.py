"""Exact and near deduplication: which documents are duplicates, decided the same way by the
local driver (streaming, below) and the Beam pipeline (`data.curation`, group-bys).

Documents are identified by their position in the input order (an int, smaller = earlier) and
each duplicate cluster keeps its earliest document:
  exact  documents with equal `content_hash` form a cluster.
  near   the clusters are the connected components of a graph of *verified LSH candidate
         pairs*: in every bucket (one band key) each member is paired with each of the bucket's
         first `candidates` members that comes before it (so a bucket of up to candidates + 1
         members compares all its pairs, and a larger one stays linear in its size), and a pair is
         an edge when the two MinHash signatures agree on at least `threshold` of the entries
         (estimated Jaccard; `verify=False` takes every pair). The rule needs only earlier
         documents, so it streams, and its components are the same whatever engine computes them
         (a union-find here, large-star/small-star rounds in Beam), unlike a greedy "first kept
         match" rule, which depends on the order decisions are taken in.
Near deduplication runs on the survivors of exact deduplication.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

from data.code import minhash


def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b digest of the document's UTF-8 bytes (exact-duplicate key)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDeduplicator:
    """Remembers content digests; a document whose digest was seen before is a duplicate."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates = 0

    def is_duplicate(self, digest: bytes) -> bool:
        """True when `digest` was seen before; otherwise records it and returns False."""
        if digest in self._seen:
            self.duplicates += 1
            return True
        self._seen.add(digest)
        return False


def is_near_duplicate(signature_a: np.ndarray, signature_b: np.ndarray, threshold: float, verify: bool) -> bool:
    """Whether a candidate pair of one LSH bucket is an edge."""
    return not verify or minhash.estimate_jaccard(signature_a, signature_b) >= threshold


def bucket_pairs(members: Iterable[int], candidates: int) -> Iterator[tuple[int, int]]:
    """(earlier, later) candidate pairs of one LSH bucket: each member with each of the bucket's
    first `candidates` members that comes before it."""
    members = sorted(set(members))
    for member in members[1:]:
        for first in members[:candidates]:
            if first >= member:
                break
            yield first, member


class NearDuplicateGraph:
    """Verified LSH candidate pairs, added one document at a time in input order, and a
    union-find over them whose roots are the earliest document of each connected component.

    Memory: per band key seen, its first `candidates` members; the signatures of documents that
    are among them somewhere (when verifying); a parent entry per joined document.
    """

    def __init__(self, bands: int, rows: int, threshold: float, verify: bool = True, candidates: int = 16):
        self.bands = bands
        self.rows = rows
        self.threshold = threshold
        self.verify = verify
        self.candidates = candidates
        self._first_members: dict[int, list[int]] = {}
        self._signatures: dict[int, np.ndarray] = {}
        self._parent: dict[int, int] = {}

    def add(self, document: int, keys: np.ndarray, signature: np.ndarray) -> None:
        """Adds a document later in the input order than every document added before.

        Args:
          document: its position in the input order.
          keys: [bands] uint64 bucket keys (`minhash.band_keys`).
          signature: [num_perm] uint32 MinHash signature.
        """
        candidate_anywhere = False
        for key in keys.tolist():
            members = self._first_members.setdefault(key, [])
            for first in members:
                if self._find(first) != self._find(document) and is_near_duplicate(
                    self._signatures.get(first), signature, self.threshold, self.verify
                ):
                    self._union(first, document)
            if len(members) < self.candidates:
                members.append(document)
                candidate_anywhere = True
        if candidate_anywhere and self.verify:
            self._signatures[document] = signature

    def _find(self, document: int) -> int:
        root = document
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while document != root:  # path compression
            self._parent[document], document = root, self._parent[document]
        return root

    def _union(self, a: int, b: int) -> None:
        root_a, root_b = self._find(a), self._find(b)
        if root_a != root_b:
            self._parent[max(root_a, root_b)] = min(root_a, root_b)

    def representative(self, document: int) -> int:
        """The earliest document of `document`'s component (itself when it is kept)."""
        return self._find(document) if document in self._parent else document
