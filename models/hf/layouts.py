"""Tensor layout changes between Hugging Face (PyTorch `nn.Linear`) and codelm parameters.

`nn.Linear` stores weight [out, in] and computes x @ W.T; codelm stores [in, out] and splits head
dimensions out: q/k/v [D, N, H], o [N, H, D]. RoPE needs no permutation: both rotate the two halves
of each head (`rotate_half`).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """A reversible map between one HF tensor and one codelm tensor (per layer, per expert)."""

    def to_codelm(self, hf: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_hf(self, codelm: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Same(Layout):
    """Norm scales, biases of unsplit dimensions, the embedding table."""

    def to_codelm(self, hf: np.ndarray) -> np.ndarray:
        return hf

    def to_hf(self, codelm: np.ndarray) -> np.ndarray:
        return codelm


@dataclasses.dataclass(frozen=True)
class Transposed(Layout):
    """nn.Linear weight [out, in] <-> [in, out] (MLPs, routers, the LM head)."""

    def to_codelm(self, hf: np.ndarray) -> np.ndarray:
        return hf.T

    def to_hf(self, codelm: np.ndarray) -> np.ndarray:
        return codelm.T


@dataclasses.dataclass(frozen=True)
class HeadsIn(Layout):
    """q/k/v projection [heads * head_dim, D] <-> [D, heads, head_dim]."""

    heads: int
    head_dim: int

    def to_codelm(self, hf: np.ndarray) -> np.ndarray:
        return hf.T.reshape(hf.shape[1], self.heads, self.head_dim)

    def to_hf(self, codelm: np.ndarray) -> np.ndarray:
        return codelm.reshape(codelm.shape[0], self.heads * self.head_dim).T


@dataclasses.dataclass(frozen=True)
class HeadsOut(Layout):
    """Output projection [D, heads * head_dim] <-> [heads, head_dim, D]."""

    heads: int
    head_dim: int

    def to_codelm(self, hf: np.ndarray) -> np.ndarray:
        return hf.T.reshape(self.heads, self.head_dim, hf.shape[0])

    def to_hf(self, codelm: np.ndarray) -> np.ndarray:
        return codelm.reshape(self.heads * self.head_dim, codelm.shape[-1]).T


@dataclasses.dataclass(frozen=True)
class HeadsBias(Layout):
    """q/k/v bias [heads * head_dim] <-> [heads, head_dim]."""

    heads: int
    head_dim: int

    def to_codelm(self, hf: np.ndarray) -> np.ndarray:
        return hf.reshape(self.heads, self.head_dim)

    def to_hf(self, codelm: np.ndarray) -> np.ndarray:
        return codelm.reshape(self.heads * self.head_dim)


def _deinterleave(rows: int, group: int, rope: int) -> np.ndarray:
    """Row order that moves, in every `group` consecutive rows, the last `rope` rows from interleaved
    RoPE pairs (x0, x1), (x2, x3), ... to codelm's halves (x0, x2, ...), (x1, x3, ...)."""
    within = np.arange(group)
    within[group - rope:] = group - rope + np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    return (np.arange(rows // group)[:, None] * group + within[None, :]).reshape(-1)


@dataclasses.dataclass(frozen=True)
class RopeRows(Layout):
    """An `inner` layout whose HF output rows hold RoPE dimensions as interleaved pairs (DeepSeek):
    in each block of `group` rows (one head, or the whole output) the last `rope` rows are reordered
    to the half-split layout of `models.layers.apply_rope`. Queries and keys get the same order, so
    their dot products, the only place these rows go, are unchanged."""

    inner: Layout
    group: int
    rope: int

    def to_codelm(self, hf: np.ndarray) -> np.ndarray:
        return self.inner.to_codelm(hf[_deinterleave(hf.shape[0], self.group, self.rope)])

    def to_hf(self, codelm: np.ndarray) -> np.ndarray:
        hf = self.inner.to_hf(codelm)
        return hf[np.argsort(_deinterleave(hf.shape[0], self.group, self.rope))]
