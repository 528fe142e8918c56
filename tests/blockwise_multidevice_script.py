"""Run by tests/test_blockwise.py in a subprocess with 8 simulated CPU devices.

The blocked ArcLoss and nearest-code search on a device mesh (blockwise.arc_loss_sharded,
blockwise.nearest_code_sharded), batch split over the batch axes and the codebook split
along K over each choice of axis, against the single-device forms; then a few train steps of
a small ArcVQ-VAE with the codebook sharded along K, on 1 and on 8 devices. Prints one line
'RESULT {json}': per case the value / gradient errors relative to the single-device answer
and whether the indices are equal; the test asserts on them.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from blockwise_fixtures import exact_units, random_data
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arcvq_jax import blockwise as st
from arcvq_jax import config as config_lib
from arcvq_jax import quantization as vq
from arcvq_jax import sharding
from arcvq_jax.quantizers import vq as vq_quantizer
from arcvq_jax.train import state as state_lib
from arcvq_jax.train import tokenizer_steps
from arcvq_jax.train.state import make_optimizer

# (mesh shape, mesh axes, batch axes, codebook axes to try)
MESHES = [
  ((8,), ("data",), ("data",), (None, "data")),
  ((4, 2), ("data", "model"), ("data",), (None, "model", "data")),
  ((2, 4), ("data", "fsdp"), ("data", "fsdp"), (None, "fsdp", "data")),
]


def datasets():
  """name -> (z (N, D), codebook (K, D)); N divisible by 8."""
  out = {}
  out["random_k600"] = random_data(0, 1024, 600, 16)
  out["random_k100"] = random_data(1, 512, 100, 8)  # K % 8 != 0: padded row shares
  rng = np.random.default_rng(2)
  # Every P_k boundary and many nearest codes are ties: only the global token / code order
  # picks the single-device answer.
  ties_e = exact_units(3, 40)
  ties_e[17] = ties_e[5]
  ties_e[33] = 2.0 * ties_e[5]
  out["ties_k40"] = (exact_units(4, 12)[rng.integers(0, 12, 512)], ties_e)
  z, e = random_data(5, 256, 48, 4)
  z[7, 1] = np.nan  # the search: NaN scores win, as in jnp.argmax
  e[29, 0] = np.nan
  out["nan_k48"] = (z, e)
  return out


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def arc_cases(data):
  results = {}
  s, m, top_k = 10.0, 0.1, 3
  for name, (z, e) in data.items():
    if name.startswith("nan"):
      continue
    # The single-device truth: the naive form (and the blocked one, which equals it).
    want_v, want_g = jax.jit(jax.value_and_grad(lambda a, b: vq.arc_loss(a, b, s, m, top_k)))(z, e)
    for shape, axes, batch_axes, codebook_axes in MESHES:
      mesh = sharding.make_mesh(shape, axes)
      for cb_axis in codebook_axes:
        if cb_axis is not None and e.shape[0] % mesh.shape[cb_axis]:
          continue
        # Small blocks (several token chunks and row blocks per device) where they matter.
        blocks = {"random_k600": ((None, None), (64, 8)), "ties_k40": ((64, 8),)}
        for chunk, code_chunk in blocks.get(name, ((None, None),)):
          fn = jax.jit(
            jax.value_and_grad(
              functools.partial(
                st.arc_loss_sharded,
                s=s,
                m=m,
                top_k=top_k,
                mesh=mesh,
                batch_axes=batch_axes,
                codebook_axis=cb_axis,
                chunk_size=chunk,
                code_chunk_size=code_chunk,
              )
            ),
            in_shardings=(NamedSharding(mesh, P(batch_axes)), NamedSharding(mesh, P(cb_axis))),
          )
          v, g = fn(z, e)
          key = (
            f"arc/{name}/{'x'.join(map(str, shape))}:{','.join(axes)}/cb={cb_axis}/chunk={chunk}"
          )
          results[key] = dict(
            value=rel_err(v, want_v),
            grad=rel_err(g, want_g),
            finite=bool(np.all(np.isfinite(np.asarray(g)))),
          )
  return results


def search_cases(data):
  results = {}
  for name, (z, e) in data.items():
    for distance in ("cosine", "euclidean"):
      want = np.asarray(vq.nearest_code(jnp.asarray(z), jnp.asarray(e), distance))
      for shape, axes, batch_axes, codebook_axes in MESHES:
        mesh = sharding.make_mesh(shape, axes)
        for cb_axis in codebook_axes:
          if cb_axis is not None and e.shape[0] % mesh.shape[cb_axis]:
            continue
          for chunk, code_chunk in ((None, st.CODE_CHUNK), (16, 4))[
            : 2 if name != "nan_k48" else 1
          ]:
            fn = jax.jit(
              functools.partial(
                st.nearest_code_sharded,
                distance=distance,
                mesh=mesh,
                batch_axes=batch_axes,
                codebook_axis=cb_axis,
                chunk_size=chunk,
                code_chunk_size=code_chunk,
              ),
              in_shardings=(NamedSharding(mesh, P(batch_axes)), NamedSharding(mesh, P(cb_axis))),
            )
            got = np.asarray(fn(z, e))
            key = (
              f"search/{name}/{distance}/{'x'.join(map(str, shape))}:{','.join(axes)}"
              f"/cb={cb_axis}/chunk={chunk}"
            )
            results[key] = dict(
              equal=bool(np.array_equal(got, want)), mismatches=int(np.sum(got != want))
            )
  return results


def train_run(devices, shape, axes, impl, codebook_axis, steps=3):
  """A few steps of a small ArcVQ-VAE; the codebook stored and searched split along K."""
  c = config_lib.vqvae_config()
  c.model.hidden, c.model.res_hidden, c.model.num_res_layers = 32, 8, 1
  c.quantizer.num_codes, c.quantizer.embed_dim = 64, 16
  c.arc.impl = c.quantizer.search_impl = impl
  c.quantizer.codebook_axis = codebook_axis
  c.sharding.mesh_shape, c.sharding.mesh_axes = shape, axes
  if codebook_axis:
    c.sharding.param_rules = (("codebook$", (codebook_axis, None)),)
  config_lib.validate(c, num_devices=len(devices))
  mesh = sharding.make_mesh(shape, axes, devices=devices)
  model = state_lib.build_model(c, channels=1)
  state, _, step_fn = tokenizer_steps.create_state_and_step(
    c, model, make_optimizer(c), mesh, (28, 28, 1), data_variance=0.3
  )
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    x = rng.uniform(-1, 1, size=(16, 28, 28, 1)).astype(np.float32)
    batch = sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))
    # Under jax.set_mesh the step's search finds the mesh too (quantizers/vq.py nearest_code).
    with jax.set_mesh(mesh):
      state, metrics = step_fn(state, batch)
    losses.append({k: float(v) for k, v in metrics.items()})
  codebook = state.params["codebook"]
  # Which search the step took: on several devices the per-device one (a shard_map).
  with jax.set_mesh(mesh):
    search = functools.partial(
      vq_quantizer.nearest_code,
      distance=c.quantizer.distance,
      search_impl=c.quantizer.search_impl,
      codebook_axis=c.quantizer.codebook_axis or None,
    )
    jaxpr = jax.make_jaxpr(search)(jnp.zeros((16 * 49, 16)), codebook)
  return losses, np.asarray(codebook), str(codebook.sharding.spec), "shard_map" in str(jaxpr)


def train_cases():
  """The blocked, codebook-sharded step on 8 devices against the naive one on 1 device.

  (8 devices with the codebook whole is tests/test_sharding.py's 'arcvq_blocked'.)
  """
  keys = ("loss", "loss_rec", "loss_vq", "loss_arc", "batch_usage", "batch_perplexity")
  want, want_cb, _, _ = train_run(jax.devices()[:1], (1,), ("data",), "naive", "")
  results = {}
  for shape, axes, cb_axis in [
    ((4, 2), ("data", "model"), "model"),
    ((2, 4), ("data", "fsdp"), "data"),
  ]:
    got, cb, spec, sharded_search = train_run(jax.devices(), shape, axes, "blocked", cb_axis)
    key = f"train/{'x'.join(map(str, shape))}:{','.join(axes)}/cb={cb_axis}"
    results[key] = dict(
      losses={k: max(rel_err(g[k], w[k]) for g, w in zip(got, want, strict=True)) for k in keys},
      loss_arc=got[0]["loss_arc"],
      codebook=rel_err(cb, want_cb),
      spec=spec,
      sharded_search=sharded_search,
    )
  return results


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  parts = sys.argv[1:] or ["arc", "search", "train"]
  out = {}
  data = datasets()
  if "arc" in parts:
    out.update(arc_cases(data))
  if "search" in parts:
    out.update(search_cases(data))
  if "train" in parts:
    out.update(train_cases())
  print("RESULT" + json.dumps(out))
