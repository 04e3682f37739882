"""Device meshes and logical-axis sharding.

Model code only names axes (`("embed", "mlp")` on a weight, `constrain(x, ("batch", "activation_length",
"activation_embed"))` on an activation). This module turns names into placements using rules kept in
config (`configs/sharding_rules.py`), so the same model runs on one CPU, a simulated 8-device mesh, a
TPU slice or several slices without a line of model code changing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from pydantic import Field

from configs.schema import ConfigError, section
from configs.sharding_rules import MESH_AXES, RULE_SETS

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
LogicalAxes = Sequence[str | None]

# ---- meshes ----------------------------------------------------------------------------------------


def _resolve_shape(shape: Mapping[str, int], n_devices: int, what: str) -> list[int]:
    """Axis sizes in MESH_AXES order; at most one -1 absorbs the remaining devices."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"{what}: unknown mesh axes {sorted(unknown)}; known axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"{what}: {n_devices} devices do not divide into the fixed axes {dict(shape)}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"{what}: axis sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, have {n_devices}")
    return sizes


def make_mesh(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh with axes MESH_AXES from per-slice (ICI) and across-slice (DCN) shapes.

    ici: axis sizes within a slice, e.g. {"fsdp": -1, "tensor": 4}; dcn: axis sizes across slices,
    e.g. {"data": 2} for two slices doing data parallelism over the data-center network. The mesh's
    size along each axis is ici * dcn. On TPU/GPU the physical topology decides device order
    (`mesh_utils`); devices without slice information (CPU) are laid out slice-major in id order.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = dict(dcn or {})
    num_slices = math.prod(int(v) for v in dcn.values()) if dcn else 1
    if len(devices) % num_slices:
        raise ValueError(f"mesh.dcn: {len(devices)} devices do not split into {num_slices} slices")
    ici_sizes = _resolve_shape(ici, len(devices) // num_slices, "mesh.ici")
    dcn_sizes = _resolve_shape(dcn, num_slices, "mesh.dcn")
    if num_slices == 1:
        try:
            grid = mesh_utils.create_device_mesh(ici_sizes, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError, AssertionError):
            grid = np.asarray(devices).reshape(ici_sizes)
    elif all(hasattr(d, "slice_index") for d in devices):
        grid = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices)
    else:
        # No slice topology (e.g. CPU): consecutive blocks of devices play the slices.
        slices = np.asarray(devices).reshape(dcn_sizes + ici_sizes)
        n = len(MESH_AXES)
        grid = slices.transpose([i // 2 + (n if i % 2 else 0) for i in range(2 * n)]).reshape(
            [d * i for d, i in zip(dcn_sizes, ici_sizes)]
        )
    return Mesh(grid, MESH_AXES)


AxisSize = Annotated[int, Field(ge=-1)]


@section
class MeshAxes:
    """Size of each mesh axis (MESH_AXES); -1 (at most one) takes the remaining devices."""

    data: AxisSize = 1
    fsdp: AxisSize = 1
    expert: AxisSize = 1
    sequence: AxisSize = 1
    tensor: AxisSize = 1

    def __post_init__(self) -> None:
        sizes = dataclasses.asdict(self)
        for axis, size in sizes.items():
            if size == 0:
                raise ConfigError(f"{axis}: must be a positive integer or -1, got 0")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"{[a for a, v in sizes.items() if v == -1][1]}: at most one axis may be -1")

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@section
class MeshConfig:
    """The `mesh` section: axis sizes within a slice (ici) and across slices (dcn), and the name of
    the logical-axis rule set (configs/sharding_rules.py)."""

    ici: MeshAxes = MeshAxes(fsdp=-1)
    dcn: MeshAxes = MeshAxes()
    rules: str = "default"

    def __post_init__(self) -> None:
        if self.rules not in RULE_SETS:
            raise ConfigError(f"rules: got {self.rules!r}, allowed values are {', '.join(RULE_SETS)}")
        if -1 in self.dcn.as_dict().values():
            raise ConfigError("dcn: -1 is for ici axes; give the number of slices explicitly")

    @property
    def rule_set(self) -> Rules:
        return RULE_SETS[self.rules]

    def make(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        return make_mesh(self.ici.as_dict(), self.dcn.as_dict(), devices)

    def shape(self, n_devices: int) -> dict[str, int]:
        """Axis sizes (ici * dcn) this config gives on `n_devices` devices; raises ConfigError."""
        dcn = self.dcn.as_dict()
        slices = math.prod(dcn.values())
        if n_devices % slices:
            raise ConfigError(f"mesh.dcn: {n_devices} devices do not split into {slices} slices")
        try:
            ici = _resolve_shape(self.ici.as_dict(), n_devices // slices, "mesh.ici")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return {axis: size * dcn[axis] for axis, size in zip(MESH_AXES, ici)}

    def batch_shards(self, n_devices: int) -> int:
        """How many ways the rules split the batch dimension: the data-parallel size."""
        shape = self.shape(n_devices)
        spec = logical_to_mesh_spec(("batch",), self.rule_set)[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
        return math.prod(shape[a] for a in axes)


def mesh_from_config(mesh_cfg: MeshConfig | Mapping[str, Any]) -> Mesh:
    """A mesh from a `MeshConfig` or a mapping with `ici` and optionally `dcn` (see `make_mesh`)."""
    if isinstance(mesh_cfg, MeshConfig):
        return mesh_cfg.make()
    return make_mesh(dict(mesh_cfg["ici"]), dict(mesh_cfg.get("dcn", {}) or {}))


# ---- logical axes -> mesh axes ---------------------------------------------------------------------


def logical_to_mesh_spec(
    logical_axes: LogicalAxes | P | None,
    rules: Rules,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> P:
    """Maps logical axis names to a PartitionSpec of mesh axes.

    A mesh axis already used by an earlier dimension is skipped. With `mesh` and `shape` given, mesh
    axes that do not divide the dimension are dropped (that dimension is replicated over them), e.g.
    2 KV heads on a tensor axis of 4.
    """
    if logical_axes is None:
        return P()
    rule_map: dict[str, tuple[str, ...]] = {}
    for name, target in rules:
        if name not in rule_map:
            rule_map[name] = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rule_map:
            raise KeyError(f"no sharding rule for logical axis {name!r}; add one to the mesh rules")
        axes = [a for a in rule_map[name] if a not in used and (mesh is None or a in mesh.shape)]
        if mesh is not None and shape is not None:
            kept, size = [], 1
            for a in axes:
                if shape[dim] % (size * mesh.shape[a]) == 0:
                    kept.append(a)
                    size *= mesh.shape[a]
            axes = kept
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def logical_sharding(logical_axes: LogicalAxes, mesh: Mesh, rules: Rules, shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, rules, mesh, shape))


_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("codelm_sharding", default=None)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activates `mesh` and `rules` for `constrain` calls traced inside the block."""
    token = _CONTEXT.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_sharding() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `sharding_context`, or None outside one."""
    return _CONTEXT.get()


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Constrains an activation's sharding by logical axis names; a no-op outside `sharding_context`."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, mesh, rules, x.shape))


# ---- parameters ------------------------------------------------------------------------------------


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every variable of an (abstract or concrete) NNX state."""

    def to_sharding(variable: Any) -> Any:
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, P())
        axes = variable.get_metadata().get("out_sharding")
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        return variable.replace(logical_sharding(axes, mesh, rules, value.shape) if axes else NamedSharding(mesh, P()))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
    """Builds the module returned by `make()` with every parameter created directly in its shard.

    `make` runs inside `jax.jit` with output shardings taken from the parameters' logical axes, so no
    device ever holds the full unsharded model.
    """
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init() -> nnx.State:
        return nnx.state(make())

    with sharding_context(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings`: a target to restore or compile into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
