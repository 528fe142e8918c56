"""Where arrays live: the device Mesh and the shardings of batches and train state.

The step says WHAT is sharded (the batch along 'data', parameters by name rules); the mesh
says HOW. With the default rules every parameter is replicated (pure data parallelism);
a rule such as ('decoder/.*/kernel$', (None, None, None, 'model')) shards a parameter
and, since the rule is matched against the whole state path, its Adam moments with it.

A mesh axis named 'fsdp' shards the state as ZeRO-3 / FSDP does: the batch is split over
('data', 'fsdp') together, and every parameter of at least `fsdp_min_size` elements (with
its optimizer moments) is split along one of its dimensions over 'fsdp'; XLA gathers it
where the step needs it whole. Parameter memory per device divides by the axis size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arcvq_jax import threefry_batching

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A Mesh over all devices; one entry of `shape` may be -1 (the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"config.sharding.mesh_shape={tuple(shape)}: at most one -1 is allowed.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
        f"config.sharding.mesh_shape={tuple(shape)} does not divide the "
        f"{len(devices)} devices. Choose sizes whose product divides it."
      )
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
      f"config.sharding.mesh_shape={tuple(shape)} needs {int(np.prod(shape))} "
      f"devices, but {len(devices)} are visible. Use -1 for one axis."
    )
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: 'data', and 'fsdp' where the mesh has one."""
  return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes ('data', and 'fsdp' if any)."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis_size: int) -> tuple[Any, ...] | None:
  """The PartitionSpec splitting `shape` over 'fsdp': its largest dimension divisible by
  the axis size (the last such one on ties: conv kernels' output channels), else None."""
  best = None
  for dim, size in enumerate(shape):
    if size % axis_size == 0 and (best is None or size >= shape[best]):
      best = dim
  if best is None:
    return None
  return tuple(FSDP_AXIS if d == best else None for d in range(len(shape)))


def tree_shardings(
  tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Sequence[Any]]] = (), fsdp_min_size: int = 0
) -> Any:
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs).

  rules: (regex, partition spec) pairs searched in the '/'-joined leaf path; the first
  match wins. Unmatched leaves of at least `fsdp_min_size` elements (> 0) are split over
  the mesh's 'fsdp' axis, if it has one (`fsdp_spec`); scalars and the rest are replicated.
  """
  compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]
  fsdp_size = dict(mesh.shape).get(FSDP_AXIS, 1)

  def leaf_sharding(path, leaf):
    name = _path_str(path)
    if getattr(leaf, "ndim", 0) > 0:
      for pattern, spec in compiled:
        if pattern.search(name):
          if len(spec) > leaf.ndim:
            raise ValueError(
              f"sharding rule {pattern.pattern!r} -> {spec} has more entries "
              f"than {name} has dimensions ({leaf.shape})."
            )
          return NamedSharding(mesh, P(*spec))
      if fsdp_size > 1 and fsdp_min_size > 0 and int(np.prod(leaf.shape)) >= fsdp_min_size:
        spec = fsdp_spec(leaf.shape, fsdp_size)
        if spec is not None:
          return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def gather_params(params: Any, replicated: NamedSharding | None) -> Any:
  """FSDP's all-gather: the parameters whole on every device for the forward/backward pass.

  Without it XLA may instead split the activations along the sharded kernels' channels
  (model parallelism), which on the f8 VQGAN took 55 % more temporaries than the
  replicated step (bench/bench_fsdp_memory.py). The gradients then leave whole and are
  reduce-scattered into the sharded optimizer update. A no-op off a mesh, or without an
  'fsdp' axis of size > 1.
  """
  if replicated is None or dict(replicated.mesh.shape).get(FSDP_AXIS, 1) == 1:
    return params
  return jax.lax.with_sharding_constraint(params, replicated)


def state_shardings(tree: Any, mesh: Mesh, sharding_config: Any) -> Any:
  """`tree_shardings` with a run's config.sharding (param_rules, fsdp_min_size)."""
  return tree_shardings(
    tree, mesh, sharding_config.param_rules, sharding_config.get("fsdp_min_size", 0)
  )


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays split along the batch axes.

  Works on one host and on many: each process passes only the rows it loaded.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


# XLA:CPU spends most of a fresh state's compile on the initialisers' threefry kernels, one per
# parameter and per folded key. On the CPU the program is compiled without LLVM's optimisation
# (a state is built once, so that costs nothing at run time; floats equal up to one ulp in a
# few leaves, LLVM's fused multiply-adds in the normal initialisers): a small VQGAN's state
# 17 s -> 9 s; and its draws are hashed together (threefry_batching: the same random bits):
# 9.0 s -> 2.8 s (docs/architecture.md, "Fresh states"). Other backends compile `init_fn` as
# it is: there a single hash over all parameters would not follow their shardings.
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def abstract_state(
  init_fn: Any, seed: int, mesh: Mesh, sharding_config: Any
) -> tuple[jax.Array, Any, Any]:
  """(PRNGKey(seed), `init_fn`'s ShapeDtypeStructs for it, their shardings by
  `state_shardings`): a train state's layout, nothing allocated."""
  key = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(init_fn, key)
  return key, abstract, state_shardings(abstract, mesh, sharding_config)


def fresh_state(init_fn: Any, seed: int, mesh: Mesh, sharding_config: Any) -> tuple[Any, Any]:
  """(`init_fn(PRNGKey(seed))` built in place, its shardings): every stage's fresh train
  state."""
  key, _, shardings = abstract_state(init_fn, seed, mesh, sharding_config)
  return init_in_place(init_fn, key, shardings), shardings


def init_in_place(init_fn: Any, key: jax.Array, shardings: Any) -> Any:
  """`init_fn(key)` built in place on the devices of `shardings` (a tree like its result)."""
  leaf = jax.tree.leaves(shardings)[0]
  if next(iter(leaf.device_set)).platform == "cpu":
    init_fn = threefry_batching.batch_draws(init_fn)
    return jax.jit(init_fn, out_shardings=shardings, compiler_options=_CPU_INIT_COMPILER_OPTIONS)(
      key
    )
  return jax.jit(init_fn, out_shardings=shardings)(key)
