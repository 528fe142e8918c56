"""A function's threefry draws batched into a few hashes, with the same random bits.

Initialising a model draws one random array per parameter (and folds a key per module path),
and XLA compiles every draw as a kernel of its own: a VQGAN's fresh state holds ~270 of
them, and on XLA:CPU they were most of its compile (docs/architecture.md, "Fresh states").
Every threefry draw is the same hash, threefry2x32(key, counter), applied elementwise: the
draws that do not depend on one another can be computed as one hash over the concatenation
of their (key, counter) pairs and cut apart again. `batch_draws(fn)` evaluates fn's jaxpr in
dependency order and does that level by level, so the random bits are those of `fn`, bit for
bit; what is computed from them is the same up to rounding (a float transform fused in another
context may round an ulp apart; tests/test_threefry_batching.py compares leaf by leaf).

Only draws it can reproduce exactly are batched: `random_bits` of 32 bits and `random_fold_in`
on one threefry key under `jax_threefry_partitionable` (the default). Anything else (other
PRNG implementations, batched keys, 8/16/64-bit draws) runs as in `fn`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.extend import random as jrandom

# A batch's hash is cut at this many elements: the transient buffers stay ~100 MB at most
# however large the model (a larger draw is hashed alone, as in `fn`).
MAX_BATCH_ELEMENTS = 1 << 22

_Atom = tuple  # ("lit", value) or ("var", n)


def batch_draws(fn: Callable[..., Any]) -> Callable[..., Any]:
  """fn with its independent threefry draws hashed together: the same random bits.

  Meant for functions that draw many arrays once (parameter initialisers) and are compiled
  once; call the result under `jax.jit`.
  """

  def batched(*args: Any) -> Any:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    counter = itertools.count()
    flat_args = jax.tree.leaves(args)
    in_atoms = [("var", next(counter)) for _ in flat_args]
    nodes: list[tuple[Any, list[_Atom], list[_Atom]]] = []
    out_atoms = _inline(closed.jaxpr, closed.consts, in_atoms, counter, nodes)
    values = _evaluate(nodes, dict(zip(in_atoms, flat_args, strict=True)))
    outs = [a[1] if a[0] == "lit" else values[a] for a in out_atoms]
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return batched


def _inline(jaxpr: Any, consts: list, in_atoms: list, counter: Any, nodes: list) -> list:
  """Appends jaxpr's equations to `nodes` as (eqn, input atoms, output atoms), with nested
  `jit` calls inlined (jax.random's functions are jitted: the draws sit inside them)."""
  env: dict[Any, _Atom] = {}
  env.update((v, ("lit", c)) for v, c in zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, in_atoms, strict=True))

  def read(a: Any) -> _Atom:
    return ("lit", a.val) if isinstance(a, jcore.Literal) else env[a]

  for eqn in jaxpr.eqns:
    ins = [read(a) for a in eqn.invars]
    if eqn.primitive.name in ("jit", "pjit"):
      inner = eqn.params["jaxpr"]
      outs = _inline(inner.jaxpr, inner.consts, ins, counter, nodes)
    else:
      outs = [("var", next(counter)) for _ in eqn.outvars]
      nodes.append((eqn, ins, outs))
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(a) for a in jaxpr.outvars]


def _evaluate(nodes: list, values: dict) -> dict:
  """Binds every equation once its inputs exist; when only draws can go on, hashes all the
  ready ones together."""

  def ready(ins: list[_Atom]) -> bool:
    return all(a[0] == "lit" or a in values for a in ins)

  def read(a: _Atom) -> Any:
    return a[1] if a[0] == "lit" else values[a]

  pending = nodes
  while pending:
    progressed = True
    while progressed:  # everything but the batchable draws, as far as it goes
      progressed, waiting = False, []
      for eqn, ins, outs in pending:
        if _batchable(eqn) or not ready(ins):
          waiting.append((eqn, ins, outs))
          continue
        with eqn.ctx.manager:
          ans = eqn.primitive.bind(*map(read, ins), **eqn.primitive.get_bind_params(eqn.params))
        values.update(zip(outs, ans if eqn.primitive.multiple_results else [ans], strict=True))
        progressed = True
      pending = waiting
    draws = [node for node in pending if ready(node[1])]
    if not draws:
      if pending:  # cannot happen for a well-formed jaxpr
        raise RuntimeError(f"threefry_batching: {pending[0][0]} never became ready")
      break
    for chunk in _chunks(draws):
      hashed = _hash_together([(eqn, [read(a) for a in ins]) for eqn, ins, _ in chunk])
      values.update((outs[0], v) for (_, _, outs), v in zip(chunk, hashed, strict=True))
    taken = {id(node) for node in draws}
    pending = [node for node in pending if id(node) not in taken]
  return values


def _batchable(eqn: Any) -> bool:
  if eqn.primitive.name not in ("random_bits", "random_fold_in"):
    return False
  if not jax.config.jax_threefry_partitionable:  # another counter layout
    return False
  key = eqn.invars[0].aval
  if key.shape != ():
    return False
  if str(key.dtype) != "key<fry>":
    return False
  if eqn.primitive.name == "random_bits":  # counters of one uint32 word
    return eqn.params["bit_width"] == 32 and _size(eqn) < 1 << 32
  return eqn.invars[1].aval.shape == ()


def _size(eqn: Any) -> int:
  return math.prod(eqn.params["shape"]) if eqn.primitive.name == "random_bits" else 1


def _chunks(draws: list) -> list[list]:
  chunks: list[list] = [[]]
  total = 0
  for node in draws:
    n = _size(node[0])
    if chunks[-1] and total + n > MAX_BATCH_ELEMENTS:
      chunks.append([])
      total = 0
    chunks[-1].append(node)
    total += n
  return chunks


def _hash_together(draws: list[tuple[Any, list]]) -> list[jax.Array]:
  """One threefry2x32 over the (key, counter) pairs of all `draws`, cut back per draw.

  random_bits(key, shape): the pairs (0, i) for i < size, result o0 ^ o1, as jax's
  partitionable threefry. fold_in(key, d): the pair (0, d) (d's threefry seed), and the new
  key is (o0, o1).
  """
  k1, k2, x0, x1, sizes = [], [], [], [], []
  for eqn, ins in draws:
    raw = jax.random.key_data(ins[0])
    n = _size(eqn)
    if eqn.primitive.name == "random_bits":
      counter = lax.iota(jnp.uint32, n)
    else:
      counter = jnp.asarray(ins[1], jnp.uint32).reshape(1)
    k1.append(jnp.broadcast_to(raw[0], (n,)))
    k2.append(jnp.broadcast_to(raw[1], (n,)))
    x0.append(jnp.zeros((n,), jnp.uint32))
    x1.append(counter)
    sizes.append(n)
  o0, o1 = jrandom.threefry2x32_p.bind(*(jnp.concatenate(a) for a in (k1, k2, x0, x1)))
  outs, start = [], 0
  for (eqn, ins), n in zip(draws, sizes, strict=True):
    a, b = o0[start : start + n], o1[start : start + n]
    start += n
    if eqn.primitive.name == "random_bits":
      outs.append((a ^ b).reshape(eqn.params["shape"]))
    else:
      impl = jax.random.key_impl(ins[0])
      outs.append(jax.random.wrap_key_data(jnp.concatenate([a, b]), impl=impl))
  return outs
