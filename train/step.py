"""The one train-step core that pretraining, SFT and RL share.

A loss function maps (model, batch) to `LossOutput(total, weight, metrics)`: `total` is a *sum* over
the tokens (or sequences) the batch trains on and `weight` how many there are, so micro-batches add
up exactly and the step divides once. Pretraining and SFT use `next_token_loss` (SFT's prompts carry
loss_mask 0); RL passes a policy-gradient loss with its own batch fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.lora import reseed_dropout
from models.mtp import depth_targets
from train.state import TrainState

Batch = dict[str, jax.Array]


class LossOutput(NamedTuple):
    total: jax.Array  # [] sum of per-token (or per-sequence) losses
    weight: jax.Array  # [] number of tokens (or sequences) in the sum
    metrics: dict[str, jax.Array]  # values to average over micro-batches, weighted by `weight`


LossFn = Callable[[nnx.Module, Batch], LossOutput]
PostUpdateFn = Callable[[nnx.Module, dict[str, jax.Array]], None]


def model_aux_loss(aux: dict[str, jax.Array]) -> jax.Array:
    """Sum of the model's auxiliary losses: aux entries named "<stack>/loss_*", over layers.

    They arrive multiplied by their coefficients (e.g. MoE load balancing, router z-loss)."""
    terms = [jnp.sum(v) for k, v in aux.items() if k.split("/")[-1].startswith("loss_")]
    return sum(terms, jnp.zeros((), jnp.float32))


def token_loss_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropies, sum of log(Z)^2) over tokens with mask > 0: logits [..., V] (made
    float32), targets and mask [...]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(jnp.square(log_z) * mask)


def chunked_token_loss_sums(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """`token_loss_sums(head(hidden), targets, mask)` without the [B, T, V] logits: a scan over pieces
    of `chunk` tokens per row, each piece's logits [B, chunk, V] recomputed in the backward pass
    (`jax.checkpoint`) instead of kept. hidden [B, T, D]; targets, mask [B, T].

    Piece i holds tokens i, i + n, i + 2n, ... (n = T / chunk pieces): strided rather than contiguous,
    so that when T is sharded over devices (context parallelism) every piece is spread over all of
    them and no piece needs another device's tokens. Rows are padded (mask 0) to a multiple of `chunk`.
    """
    b, t, d = hidden.shape
    pad = -t % chunk
    if pad:
        hidden, targets, mask = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (hidden, targets, mask))
    n = (t + pad) // chunk

    def pieces(x: jax.Array) -> jax.Array:  # [B, chunk * n, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)

    @jax.checkpoint
    def piece_sums(h: jax.Array, tgt: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        return token_loss_sums(head(h), tgt, m)

    def add_piece(carry: tuple[jax.Array, jax.Array], piece: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, jax.Array], None]:
        return jax.tree.map(jnp.add, carry, piece_sums(*piece)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(add_piece, (zero, zero), (pieces(hidden), pieces(targets), pieces(mask)))
    return sums


def head_loss_sums(model: nnx.Module, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`token_loss_sums` of the model's output head on hidden [B, T, D]: chunked when `chunk` > 0
    (`chunked_token_loss_sums`), else over the whole [B, T, V] logits."""
    if chunk:
        return chunked_token_loss_sums(model.logits, hidden, targets, mask, chunk)
    return token_loss_sums(model.logits(hidden), targets, mask)


def multi_token_loss_sums(
    model: nnx.Module, batch: Batch, hidden: jax.Array, chunk: int
) -> tuple[list[jax.Array], dict[str, jax.Array]]:
    """Summed cross-entropies of the multi-token-prediction depths k = 1..cfg.mtp_depth (models/mtp.py),
    each over the pairs `depth_targets` gives it, and the depths' aux (none without MTP). hidden: the
    decoder's final-normed output [B, T, D]."""
    if not model.cfg.mtp_depth:
        return [], {}
    states, aux = model.mtp(model.embed_tokens, hidden, batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    sums = []
    for k, state in enumerate(states, start=1):
        targets, depth_mask = depth_targets(batch["targets"], mask, batch["segment_ids"], k)
        sums.append(head_loss_sums(model, state, targets, depth_mask, chunk)[0])
    return sums, aux


def next_token_loss(model: nnx.Module, batch: Batch, z_loss: float = 0.0, chunk: int | None = None) -> LossOutput:
    """Cross-entropy of `targets` given `inputs`, over positions where loss_mask > 0.

    batch: inputs, targets, positions, segment_ids [B, T] int32; loss_mask [B, T] float32.
    z_loss adds z_loss * log(Z)^2 per token (PaLM), keeping the softmax normaliser near 1.
    chunk (default `model.cfg.cross_entropy_chunk`): tokens per row whose logits exist at once
    (`chunked_token_loss_sums`); 0 computes the whole [B, T, V] logits.
    With `cfg.mtp_depth` = D > 0 the loss adds DeepSeek-V3's multi-token prediction, lambda / D * sum_k
    L_k (lambda = `cfg.mtp_loss_weight`), L_k being depth k's summed cross-entropy over the main loss's
    token count (the paper's 1/T), logged as "mtp_loss/<k>"; its MoE aux joins the model's.
    """
    cfg = model.cfg
    chunk = cfg.cross_entropy_chunk if chunk is None else chunk
    mask = batch["loss_mask"].astype(jnp.float32)
    hidden, aux, _ = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    xent_sum, log_z_sq_sum = head_loss_sums(model, hidden, batch["targets"], mask, chunk)
    mtp_sums, mtp_aux = multi_token_loss_sums(model, batch, hidden, chunk)
    aux = {**aux, **mtp_aux}
    n_tokens = jnp.sum(mask)
    denom = jnp.maximum(n_tokens, 1)
    z_sum = z_loss * log_z_sq_sum
    aux_loss = model_aux_loss(aux)
    total = xent_sum + z_sum + aux_loss * n_tokens
    if mtp_sums:
        total += cfg.mtp_loss_weight / len(mtp_sums) * sum(mtp_sums)
    # The model's aux outputs keep their per-layer axis ([layers] or [layers, experts]); the loop's
    # logger summarises them and `post_update` (MoE bias balancing) reads them.
    metrics = {"xent": xent_sum / denom, "aux_loss": aux_loss, **aux}
    metrics.update({f"mtp_loss/{k}": s / denom for k, s in enumerate(mtp_sums, start=1)})
    if z_loss:
        metrics["z_loss"] = z_sum / denom
    return LossOutput(total, n_tokens, metrics)


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """`on_true` if pred else `on_false`, choosing whole buffers (no elementwise pass over the
    parameters and optimizer moments on the hot path)."""
    return jax.lax.cond(pred, lambda: on_true, lambda: on_false)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    post_update: PostUpdateFn | None = None,
    trainable: Any = nnx.Param,
    dropout_seed: int | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns `step(state, batch) -> (state, metrics)`, to be jitted with the state donated.

    batch leaves are [micro_batches, micro_batch_size, ...]: gradients of the summed loss are
    accumulated over micro-batches and divided by the total weight, so k micro-batches give the
    same update as one k-times-larger batch. A non-finite loss or gradient norm leaves params and
    optimizer state unchanged and is recorded in the state (the loop stops or continues).
    `post_update(model, metrics)` may update non-parameter variables from the step's averaged
    metrics (MoE router biases from the per-layer expert loads). `trainable` is the filter that split
    the state into params and rest (`train.state.split_model`). With `dropout_seed`, the model runs
    in training mode and its dropout streams (LoRA adapters) are reseeded from (seed, step, micro-batch),
    so masks differ from step to step and a resumed run draws the same ones.
    """

    def micro_step(
        params: nnx.State, rest: nnx.State, micro: Batch, key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, dict, nnx.State]:
        def objective(params: nnx.State) -> tuple[jax.Array, LossOutput]:
            # copy: `rest` (e.g. MoE router biases) comes from outside this grad trace.
            model = nnx.merge(graphdef, params, rest, copy=True)
            if key is not None:
                model.train()
                reseed_dropout(model, key)
            out = loss_fn(model, micro)
            return out.total, out

        (_, out), grads = jax.value_and_grad(objective, has_aux=True)(params)
        weighted = jax.tree.map(lambda m: m * out.weight, out.metrics)
        return out.total, out.weight, weighted, grads

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        step_key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state.step)

        def micro_key(index: jax.Array | int) -> jax.Array | None:
            return None if step_key is None else jax.random.fold_in(step_key, index)

        def accumulate(carry: tuple, indexed: tuple[jax.Array, Batch]) -> tuple[tuple, None]:
            index, micro = indexed
            total, weight, metrics, grads = micro_step(state.params, state.rest, micro, micro_key(index))
            return jax.tree.map(jnp.add, carry, (total, weight, metrics, grads)), None

        first = jax.tree.map(lambda x: x[0], batch)
        carry = micro_step(state.params, state.rest, first, micro_key(0))
        if n_micro > 1:
            rest_of_batch = jax.tree.map(lambda x: x[1:], batch)
            carry, _ = jax.lax.scan(accumulate, carry, (jnp.arange(1, n_micro), rest_of_batch))
        total, weight, metrics, grads = carry
        denom = jnp.maximum(weight, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = state.rest
        metrics = {k: v / denom for k, v in metrics.items()}
        if post_update is not None:
            model = nnx.merge(graphdef, params, rest, copy=True)
            post_update(model, metrics)
            _, _, rest = nnx.split(model, trainable, ...)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, rest, opt_state = _select(
            finite, (params, rest, opt_state), (state.params, state.rest, state.opt_state)
        )
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            rest=rest,
            opt_state=opt_state,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
            ),
        )
        metrics.update(loss=loss, grad_norm=grad_norm, tokens=weight)
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Returns `eval_step(state, batch) -> {"loss_sum", "weight"}` for one [B, T] batch."""

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        out = loss_fn(nnx.merge(graphdef, state.params, state.rest), batch)
        return {"loss_sum": out.metrics["xent"] * out.weight, "weight": out.weight}

    return eval_step
