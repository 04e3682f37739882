"""Multi-token prediction (MTP; DeepSeek-V3, DeepSeek-AI 2024, sec. 2.2): training-only heads that
predict tokens further ahead, sharing the decoder's embedding, output head and block code.

Depth k = 1..D keeps one sequential chain: from h^0, the decoder's final-normed output, and the
embedding of the token k ahead,

    h'^k_i = W_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]      (W_k: [2D, D], the concat projected)
    h^k = Block_k(h'^k)                                           (one decoder block, causal)
    P^k_i = OutHead(Norm_k(h^k_i))                                predicts t_{i+k+1}

so position i of depth k sees tokens up to t_{i+k} and predicts t_{i+k+1}. With the batch's
next-token pairs (inputs[i] = t_i, targets[i] = t_{i+1}), depth k reads inputs[i + k] and predicts
targets[i + k] (`depth_targets`): the last k positions of a row, and positions whose document ends
within k tokens in a packed row, have no target. Sequences keep their length T (the shifted tokens
are padded at the end), so positions, segment ids and sequence sharding are the decoder's.

The released DeepSeek-V3 weights order the projection's input [Emb; h] (`eh_proj`; transformers
drops that layer at load); this module follows the paper's [h; Emb].
Shape letters: B batch, T length, D d_model, V vocabulary, k depth (1-indexed).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.decoder import Aux, LayerStack, StackPlan, layer_specs
from models.layers import dtype_of, make_norm, normal, param
from models.sharding import constrain


def shift_left(x: jax.Array, k: int) -> jax.Array:
    """x [B, T, ...] -> y with y[:, i] = x[:, i + k], the last k positions zero."""
    return jnp.pad(x[:, k:], [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2))


def depth_targets(
    targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """Depth k's targets and loss mask [B, T]: position i predicts targets[i + k] where that pair is
    trained (loss_mask[i + k]) and lies in position i's document (same nonzero segment id); the last
    k positions predict nothing."""
    same_document = (shift_left(segment_ids, k) == segment_ids) & (segment_ids > 0)
    return shift_left(targets, k), shift_left(loss_mask, k) * same_document.astype(loss_mask.dtype)


class MTPDepth(nnx.Module):
    """One prediction depth: (h^{k-1} [B, T, D], Emb(t_{i+k}) [B, T, D]) -> h^k [B, T, D].

    The block is the decoder's last layer (its window, dense or MoE feed-forward), built as a one-layer
    `LayerStack` named `name`: it shares the decoder's block code, remat and scan, and its aux entries
    ("<name>/loss_*", "<name>/expert_load") reach the auxiliary losses and router-bias updates as the
    decoder stacks' do (`models.moe.apply_bias_updates` finds a layer by its "stacks/<name>" path).
    """

    def __init__(self, cfg: ModelConfig, name: str, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.name = name
        self.hidden_norm = make_norm(cfg, d, rngs)
        self.embed_norm = make_norm(cfg, d, rngs)
        self.proj = param(rngs, normal(cfg.init_std), (2 * d, d), ("concat_embed", "embed"), dtype_of(cfg.param_dtype))
        plan = StackPlan(name, cfg.n_layers, (layer_specs(cfg)[-1],), 1)
        self.stacks = nnx.Dict({name: LayerStack(cfg, plan, rngs=rngs)})
        self.norm = make_norm(cfg, d, rngs)  # before the shared output head

    def __call__(
        self, hidden: jax.Array, embedded: jax.Array, positions: jax.Array, segment_ids: jax.Array
    ) -> tuple[jax.Array, Aux]:
        """-> (h^k [B, T, D] before `norm`, aux "<name>/..." with a leading [1] layer axis)."""
        x = jnp.concatenate([self.hidden_norm(hidden), self.embed_norm(embedded)], axis=-1)
        x = jnp.einsum("bte,ed->btd", x, self.proj[...].astype(x.dtype))
        x = constrain(x, ("batch", "activation_length", "activation_embed"))
        x, aux, _ = self.stacks[self.name](x, positions, segment_ids, None)
        return x, {f"{self.name}/{key}": value for key, value in aux.items()}


class MultiTokenPrediction(nnx.Module):
    """The `cfg.mtp_depth` sequential depths ("mtp_1", "mtp_2", ...), built by the decoder as `mtp`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.depths = nnx.List([MTPDepth(cfg, f"mtp_{k}", rngs=rngs) for k in range(1, cfg.mtp_depth + 1)])

    def __call__(
        self, embed_tokens: Callable[[jax.Array], jax.Array], hidden: jax.Array, inputs: jax.Array,
        positions: jax.Array, segment_ids: jax.Array,
    ) -> tuple[list[jax.Array], Aux]:
        """hidden [B, T, D]: the decoder's final-normed output for `inputs` [B, T]; `embed_tokens`:
        the decoder's tokens -> [B, T, D] embedding. Returns, per depth k, the normed states [B, T, D]
        whose logits (the decoder's head) predict `depth_targets(..., k)`, and the depths' aux."""
        outputs, aux = [], {}
        for k, depth in enumerate(self.depths, start=1):
            hidden, depth_aux = depth(hidden, embed_tokens(shift_left(inputs, k)), positions, segment_ids)
            outputs.append(depth.norm(hidden))
            aux.update(depth_aux)
        return outputs, aux
