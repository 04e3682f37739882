"""The training state: everything a checkpoint must hold to continue a run exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from models.sharding import Rules, sharding_context, state_shardings


@struct.dataclass
class TrainState:
    """step: updates applied. params: trainable nnx.Param state. rest: the model's other variables
    (e.g. MoE router biases, updated outside the gradient). nonfinite_steps: updates skipped because
    the loss or gradient was NaN/inf; first_nonfinite_step: the first such step, -1 if none."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    nonfinite_steps: jax.Array
    first_nonfinite_step: jax.Array


Filter = Any  # an nnx filter: a Variable type (nnx.Param, nnx.LoRAParam), a path predicate, ...


def split_model(model: nnx.Module, trainable: Filter = nnx.Param) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): the static structure, the trainable variables (`trainable`: all
    parameters for full training, `nnx.LoRAParam` for LoRA) and every other variable."""
    return nnx.split(model, trainable, ...)


def init_train_state(
    make_model: Callable[[], nnx.Module],
    make_tx: Callable[[nnx.State], optax.GradientTransformation],
    mesh: Mesh,
    rules: Rules,
    *,
    trainable: Filter = nnx.Param,
    pretrained: nnx.Module | None = None,
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation, Any]:
    """Builds the initial state directly sharded on `mesh`: a fresh `make_model()` (created inside
    jit, so no device ever holds it unsharded), or the weights of `pretrained` (placed on the mesh;
    its arrays are donated to the state).

    Parameters get the shardings their logical axes map to; the optimizer state (over the
    `trainable` variables only: frozen weights get none) inherits them through XLA's sharding
    propagation. Returns (graphdef, state, tx, state_shardings); the shardings are also the restore target.
    """
    template = pretrained if pretrained is not None else nnx.eval_shape(make_model)
    graphdef, abstract_params, abstract_rest = split_model(template, trainable)
    tx = make_tx(abstract_params)
    param_shardings = state_shardings(abstract_params, mesh, rules)
    rest_shardings = state_shardings(abstract_rest, mesh, rules)

    def build(params: nnx.State, rest: nnx.State) -> TrainState:
        params = jax.lax.with_sharding_constraint(params, param_shardings)
        rest = jax.lax.with_sharding_constraint(rest, rest_shardings)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            rest=rest,
            opt_state=tx.init(params),
            nonfinite_steps=jnp.zeros((), jnp.int32),
            first_nonfinite_step=jnp.full((), -1, jnp.int32),
        )

    with sharding_context(mesh, rules):
        if pretrained is None:
            compiled = jax.jit(lambda: build(*split_model(make_model(), trainable)[1:])).lower().compile()
            state = compiled()
        else:
            compiled = jax.jit(build, donate_argnums=(0, 1)).lower(abstract_params, abstract_rest).compile()
            state = compiled(abstract_params, abstract_rest)
    return graphdef, state, tx, compiled.output_shardings
