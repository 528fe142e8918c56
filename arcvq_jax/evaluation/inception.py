"""The FID Inception-v3 (pytorch-fid's / the TTUR code's network) in Flax, NHWC.

  images (B, H, W, C), uint8 or float in [-1, 1], C in {1, 3}
    -> 8-bit levels u (floats are quantised as if saved as PNG), x = u / 255
    -> bilinear resize to 299 x 299 (PyTorch's `F.interpolate(..., align_corners=False)`,
       no antialiasing, as pytorch-fid), grey repeated to RGB, x <- 2x - 1
    -> Inception-v3 with the FID patches (average pools that ignore the padding, a max pool in
       Mixed_7c's pool branch) -> `pool` (B, 2048), the final average pool (FID, precision and
       recall) and `logits` (B, 1008) = pool @ fc.weight.T, the 1008-way logits WITHOUT the fc
       bias: what the original Inception Score code (improved-gan, `softmax/logits/MatMul`) and
       torch-fidelity's `logits_unbiased` use.

Parameters come from the file that `python -m arcvq_jax.convert.inception_weights` writes from
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`. Every BasicConv2d (conv without bias,
BatchNorm(eps=1e-3) in eval mode, ReLU) is stored with its BatchNorm folded in:

  params[block][conv] = {'kernel': (kh, kw, Cin, Cout), 'bias': (Cout,)}
    kernel = w.permute(2, 3, 1, 0) * s, bias = beta - running_mean * s,
    s = gamma / sqrt(running_var + 1e-3)         (torchvision names: Mixed_5b/branch1x1, ...)
  params['fc'] = {'kernel': (2048, 1008), 'bias': (1008,)}   (fc.weight.T, fc.bias)

File format: one .npz with keys 'Conv2d_1a_3x3/kernel', 'Mixed_5b/branch1x1/bias', 'fc/kernel',
... (`save_params`). `InceptionFeatures` runs the network jitted and sharded over a device mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from arcvq_jax import npz_files
from arcvq_jax import sharding as sharding_lib
from arcvq_jax.models import layers
from arcvq_jax.models.layers import Conv

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3  # torchvision's BasicConv2d

FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  "pt_inception-2015-12-05-6726825d.pth"
)
DEFAULT_PATH = "~/.cache/arcvq_jax/pt_inception-2015-12-05.npz"
CONVERT_COMMAND = (
  "python -m arcvq_jax.convert.inception_weights "
  "--pt=pt_inception-2015-12-05-6726825d.pth --out={out}"
)


def provide_command(path: str) -> str:
  """The one shell command that makes the weights file at `path` (needs the internet once,
  and torch for the conversion only)."""
  return f"pip install torch && wget -nc {FID_WEIGHTS_URL} && {CONVERT_COMMAND.format(out=path)}"


class InceptionWeightsError(ValueError):
  """An Inception weights file that is missing, damaged or of another network."""


# ------------------------------------------------------------------------------ the network
# Each BasicConv2d: (name, Cout, kernel (kh, kw), stride, padding (ph, pw)). Cin follows from
# the input; `layer_specs` lists them all with Cin for the file checks and the converter.


def _c(
  name: str,
  cout: int,
  k: int | tuple[int, int] = 1,
  stride: int = 1,
  pad: int | tuple[int, int] = 0,
) -> tuple[str, int, tuple[int, int], int, tuple[int, int]]:
  k = (k, k) if isinstance(k, int) else k
  pad = (pad, pad) if isinstance(pad, int) else pad
  return (name, cout, k, stride, pad)


STEM = (
  _c("Conv2d_1a_3x3", 32, 3, 2),
  _c("Conv2d_2a_3x3", 32, 3),
  _c("Conv2d_2b_3x3", 64, 3, 1, 1),
  "maxpool",
  _c("Conv2d_3b_1x1", 80),
  _c("Conv2d_4a_3x3", 192, 3),
  "maxpool",
)


def _block_a(pool_features: int) -> dict[str, tuple]:
  """FIDInceptionA: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool (no pad count) -> 1x1."""
  return dict(
    branch1x1=(_c("branch1x1", 64),),
    branch5x5=(_c("branch5x5_1", 48), _c("branch5x5_2", 64, 5, 1, 2)),
    branch3x3dbl=(
      _c("branch3x3dbl_1", 64),
      _c("branch3x3dbl_2", 96, 3, 1, 1),
      _c("branch3x3dbl_3", 96, 3, 1, 1),
    ),
    branch_pool=("avgpool", _c("branch_pool", pool_features)),
  )


def _block_b() -> dict[str, tuple]:
  """InceptionB (Mixed_6a, 35 -> 17): 3x3 s2 | 1x1 -> 3x3 -> 3x3 s2 | max pool s2."""
  return dict(
    branch3x3=(_c("branch3x3", 384, 3, 2),),
    branch3x3dbl=(
      _c("branch3x3dbl_1", 64),
      _c("branch3x3dbl_2", 96, 3, 1, 1),
      _c("branch3x3dbl_3", 96, 3, 2),
    ),
    branch_pool=("maxpool",),
  )


def _block_c(c7: int) -> dict[str, tuple]:
  """FIDInceptionC: factorised 7x7 convolutions, avg pool without the padding."""
  return dict(
    branch1x1=(_c("branch1x1", 192),),
    branch7x7=(
      _c("branch7x7_1", c7),
      _c("branch7x7_2", c7, (1, 7), 1, (0, 3)),
      _c("branch7x7_3", 192, (7, 1), 1, (3, 0)),
    ),
    branch7x7dbl=(
      _c("branch7x7dbl_1", c7),
      _c("branch7x7dbl_2", c7, (7, 1), 1, (3, 0)),
      _c("branch7x7dbl_3", c7, (1, 7), 1, (0, 3)),
      _c("branch7x7dbl_4", c7, (7, 1), 1, (3, 0)),
      _c("branch7x7dbl_5", 192, (1, 7), 1, (0, 3)),
    ),
    branch_pool=("avgpool", _c("branch_pool", 192)),
  )


def _block_d() -> dict[str, tuple]:
  """InceptionD (Mixed_7a, 17 -> 8)."""
  return dict(
    branch3x3=(_c("branch3x3_1", 192), _c("branch3x3_2", 320, 3, 2)),
    branch7x7x3=(
      _c("branch7x7x3_1", 192),
      _c("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
      _c("branch7x7x3_3", 192, (7, 1), 1, (3, 0)),
      _c("branch7x7x3_4", 192, 3, 2),
    ),
    branch_pool=("maxpool",),
  )


def _block_e(pool: str) -> dict[str, tuple]:
  """FIDInceptionE_1 (pool 'avgpool') / E_2 ('maxpool3s1'): the 3x3 branches split into a
  1x3 and a 3x1 conv whose outputs are concatenated ('split')."""
  return dict(
    branch1x1=(_c("branch1x1", 320),),
    branch3x3=(
      _c("branch3x3_1", 384),
      (
        "split",
        _c("branch3x3_2a", 384, (1, 3), 1, (0, 1)),
        _c("branch3x3_2b", 384, (3, 1), 1, (1, 0)),
      ),
    ),
    branch3x3dbl=(
      _c("branch3x3dbl_1", 448),
      _c("branch3x3dbl_2", 384, 3, 1, 1),
      (
        "split",
        _c("branch3x3dbl_3a", 384, (1, 3), 1, (0, 1)),
        _c("branch3x3dbl_3b", 384, (3, 1), 1, (1, 0)),
      ),
    ),
    branch_pool=(pool, _c("branch_pool", 192)),
  )


# The mixed blocks in order; each output is the channel concatenation of its branches.
MIXED = (
  ("Mixed_5b", _block_a(32)),
  ("Mixed_5c", _block_a(64)),
  ("Mixed_5d", _block_a(64)),
  ("Mixed_6a", _block_b()),
  ("Mixed_6b", _block_c(128)),
  ("Mixed_6c", _block_c(160)),
  ("Mixed_6d", _block_c(160)),
  ("Mixed_6e", _block_c(192)),
  ("Mixed_7a", _block_d()),
  ("Mixed_7b", _block_e("avgpool")),
  ("Mixed_7c", _block_e("maxpool3s1")),  # pytorch-fid's FIDInceptionE_2 patch
)


def _pool(x: jax.Array, kind: str) -> jax.Array:
  if kind == "maxpool":  # nn.MaxPool2d(3, stride=2), floor mode
    return nn.max_pool(x, (3, 3), strides=(2, 2))
  if kind == "maxpool3s1":  # F.max_pool2d(x, 3, stride=1, padding=1)
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
  # F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False): TF's average pool.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _basic_conv(x: jax.Array, spec: tuple, conv_impl: str) -> jax.Array:
  """BasicConv2d with its BatchNorm folded into the kernel and bias: conv + bias, ReLU."""
  name, cout, k, stride, pad = spec
  return nn.relu(Conv(cout, k, stride, pad, impl=conv_impl, name=name)(x))


class _Mixed(nn.Module):
  """One mixed block: its branches (see MIXED) side by side, concatenated over channels."""

  branches: tuple[tuple[Any, ...], ...]
  conv_impl: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    outputs = []
    for ops in self.branches:
      y = x
      for op in ops:
        if isinstance(op, str):
          y = _pool(y, op)
        elif op[0] == "split":
          y = jnp.concatenate([_basic_conv(y, spec, self.conv_impl) for spec in op[1:]], -1)
        else:
          y = _basic_conv(y, op, self.conv_impl)
      outputs.append(y)
    return jnp.concatenate(outputs, axis=-1)


class _Logits(nn.Module):
  """fc: pool (B, 2048) -> pool @ kernel (B, 1008). The bias is a parameter (the file keeps
  it) but is not added: the Inception Score's logits are unbiased (see the module doc)."""

  @nn.compact
  def __call__(self, pool: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_LOGITS))
    self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    return jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)


class FIDInceptionV3(nn.Module):
  """x (B, 299, 299, 3) in [-1, 1] (see `preprocess`) -> (pool (B, 2048), logits (B, 1008)).

  Parameter names are torchvision's module paths (Conv2d_1a_3x3, Mixed_5b/branch1x1, fc).
  conv_impl: `layers.Conv`'s implementation ('xla', 'gemm', 'onednn' or 'auto'); all give the same
  result up to float rounding.
  """

  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    for op in STEM:
      x = _pool(x, op) if isinstance(op, str) else _basic_conv(x, op, self.conv_impl)
    for block, branches in MIXED:
      x = _Mixed(tuple(branches.values()), self.conv_impl, name=block)(x)
    pool = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1): (B, 2048)
    return pool, _Logits(name="fc")(pool)


def layer_specs() -> dict[str, tuple[tuple[int, int], int, int]]:
  """'Mixed_5b/branch1x1' (torchvision's module path with '/') -> ((kh, kw), Cin, Cout) of
  every BasicConv2d, in network order."""
  specs: dict[str, tuple[tuple[int, int], int, int]] = {}
  cin = 3
  for op in STEM:
    if not isinstance(op, str):
      specs[op[0]] = (op[2], cin, op[1])
      cin = op[1]
  for block, branches in MIXED:
    cout_total = 0
    for ops in branches.values():
      c = cin
      for op in ops:
        if isinstance(op, str):
          continue
        convs = op[1:] if op[0] == "split" else (op,)
        for spec in convs:
          specs[f"{block}/{spec[0]}"] = (spec[2], c, spec[1])
        c = sum(spec[1] for spec in convs)
      cout_total += c
    cin = cout_total
  assert cin == POOL_DIM, cin
  return specs


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat key -> shape of every array in an Inception weights file."""
  shapes: dict[str, tuple[int, ...]] = {}
  for name, ((kh, kw), cin, cout) in layer_specs().items():
    shapes[f"{name}/kernel"] = (kh, kw, cin, cout)
    shapes[f"{name}/bias"] = (cout,)
  shapes["fc/kernel"] = (POOL_DIM, NUM_LOGITS)
  shapes["fc/bias"] = (NUM_LOGITS,)
  return shapes


# ------------------------------------------------------------------------- preprocessing


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of PyTorch's 1-D linear interpolation with
  align_corners=False (`upsample_bilinear2d`): source position max((o + 0.5) s - 0.5, 0),
  s = in/out, between its floor and floor + 1 (clamped to the last pixel). No antialiasing."""
  # In float32, as PyTorch's CPU kernel computes the positions and weights for float images.
  scale = np.float32(in_size / out_size)
  src = np.maximum(
    scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
    np.float32(0.0),
  )
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0.astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), i0), np.float32(1.0) - frac)
  np.add.at(m, (np.arange(out_size), i1), frac)
  return m


def to_uint8_levels(images: jax.Array) -> jax.Array:
  """Float images in [-1, 1] -> float32 8-bit levels round((x + 1) 127.5) in [0, 255], what
  saving them as PNG keeps. uint8 input is returned as float32 levels unchanged."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32)
  return jnp.round(jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0))


def preprocess(images: jax.Array, quantize: bool = True) -> jax.Array:
  """pytorch-fid's input path: (B, H, W, C) uint8, or float in [-1, 1] -> (B, 299, 299, 3)
  float32 in [-1, 1].

  quantize: floats are first rounded to 8-bit levels, as if saved as PNG and read by
  pytorch-fid (uint8 input already is). With False they map to [0, 1] as (x + 1) / 2, clipped.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be (B, H, W, 1 or 3), got {images.shape}.")
  if images.dtype == jnp.uint8 or quantize:
    x = to_uint8_levels(images) / 255.0  # torchvision's ToTensor
  else:
    x = jnp.clip((images.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
  _, h, w, _ = x.shape
  rh, rw = resize_matrix(h, INPUT_SIZE), resize_matrix(w, INPUT_SIZE)
  x = jnp.einsum("oh,bhwc,pw->bopc", rh, x, rw, precision=jax.lax.Precision.HIGHEST)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)  # PIL's convert('RGB') of a grey image
  return 2.0 * x - 1.0


def inception_apply(
  params: Any, images: jax.Array, quantize: bool = True, conv_impl: str = "xla"
) -> tuple[jax.Array, jax.Array]:
  """images (B, H, W, C) uint8 or float in [-1, 1] -> (pool (B, 2048), logits (B, 1008)),
  float32. Pure; jit it (or use `InceptionFeatures`)."""
  x = preprocess(images, quantize)
  return FIDInceptionV3(conv_impl=conv_impl).apply({"params": params}, x)


class InceptionFeatures:
  """The FID Inception jitted over a device mesh: batches split along 'data', params
  replicated, outputs replicated (so every process sees the features of the global batch).

  Call it with THIS process's rows of a global batch of `batch_size` images (fewer rows are
  padded; more are cut into several batches). On one host that is simply the images.

    feats = InceptionFeatures(load_params(path))
    pool, logits = feats(images)      # numpy float32 (n, 2048), (n, 1008)

  conv_impl: `layers.Conv`'s form (default 'onednn': oneDNN's convolution on the CPU, XLA's
  elsewhere); conv_library: on the CPU, which XLA library runs the other convolutions
  ('eigen', the default, or 'ynn'; `layers.compiler_options`).
  Convolutions run at float32 'highest' precision (no TF32 or bf16 passes on GPUs/TPUs): on
  the CPU the features agree with pytorch-fid's to 7e-7 (tests/test_inception.py).
  """

  def __init__(
    self,
    params: Any,
    batch_size: int = 100,
    mesh: jax.sharding.Mesh | None = None,
    quantize: bool = True,
    conv_impl: str | None = None,
    conv_library: str | None = None,
  ):
    # On the CPU XLA's convolution on Eigen ran 1.6x faster than im2col + GEMM under XLA's
    # default YNNPACK, which was 1.4x YNNPACK's own convolution (bench/bench_inception.py:
    # 786 / 1291 / 1736 ms for 20 images); oneDNN's convolution (`layers.conv_onednn`, which
    # is XLA's where the jaxlib lacks oneDNN and off the CPU) 1.1x faster again (28.3 against
    # 25.0 images/s at batch 50); on GPU/TPU the options do nothing.
    self.conv_impl = conv_impl or "onednn"
    self.conv_library = conv_library or "eigen"
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh((-1,), ("data",))
    n_data = self.mesh.shape[sharding_lib.DATA_AXIS]
    if batch_size % n_data or batch_size % jax.process_count():
      raise ValueError(
        f"the Inception batch size {batch_size} must be a multiple of the "
        f"{n_data} devices along 'data' and of the {jax.process_count()} processes."
      )
    self.batch_size = batch_size
    self.local_batch_size = batch_size // jax.process_count()
    self._batch_sharding = sharding_lib.batch_sharding(self.mesh)
    replicated = sharding_lib.replicated(self.mesh)
    self.params = jax.device_put(params, replicated)
    self.fingerprint = fingerprint(params)
    self._fn = jax.jit(
      lambda p, x: inception_apply(p, x, quantize=quantize, conv_impl=self.conv_impl),
      in_shardings=(replicated, self._batch_sharding),
      out_shardings=replicated,
      compiler_options=layers.compiler_options(self.conv_library),
    )

  def _global_batch(self, local: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pad = self.local_batch_size - local.shape[0]
    if pad:
      local = np.concatenate([local, np.zeros((pad, *local.shape[1:]), local.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    x = jax.make_array_from_process_local_data(self._batch_sharding, local)
    with jax.default_matmul_precision("highest"):
      pool, logits = self._fn(self.params, x)
    if jax.process_count() > 1:  # every process's mask, in the global batch's row order
      mask = np.asarray(multihost_utils.process_allgather(mask)).reshape(-1)
    return np.asarray(pool)[mask], np.asarray(logits)[mask]

  def __call__(
    self, images: np.ndarray, mask: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """This process's images (n, H, W, C), uint8 or float in [-1, 1], and optionally their
    (n,) bool mask (False: padding, dropped) -> pool features (m, 2048) and logits (m, 1008)
    float32 of the kept rows of all processes (on one host: the kept rows of `images`).

    Processes run ceil(n / local batch) global batches: they must pass the same n.
    """
    images = np.asarray(images)
    mask = np.ones(len(images), bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != images.shape[:1]:
      raise ValueError(f"mask {mask.shape} does not match the {len(images)} images.")
    pools, logits = [], []
    for start in range(0, max(len(images), 1), self.local_batch_size):
      stop = start + self.local_batch_size
      pool, logit = self._global_batch(images[start:stop], mask[start:stop])
      pools.append(pool)
      logits.append(logit)
    return np.concatenate(pools), np.concatenate(logits)


# ---------------------------------------------------------------------------------- files


def to_flat(params: Any) -> dict[str, np.ndarray]:
  """Params -> {'Mixed_5b/branch1x1/kernel': float32 array, ...}, the file's keys."""
  return npz_files.flatten(params)


def check_params(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises InceptionWeightsError naming the first missing or wrongly shaped array."""
  npz_files.check_shapes(
    flat,
    expected_shapes(),
    source,
    InceptionWeightsError,
    "a FID Inception weights file",
    CONVERT_COMMAND.format(out=source),
  )


def from_flat(flat: dict[str, np.ndarray], source: str = "the weights") -> Any:
  check_params(flat, source)
  return npz_files.unflatten({k: flat[k] for k in expected_shapes()})


def load_params(path: str) -> Any:
  """The Inception params of a file written by `save_params` (local path or gs://)."""
  flat = npz_files.read_weights(
    path,
    InceptionWeightsError,
    "FID Inception weights",
    "FID, IS and precision/recall need the Inception weights of pytorch-fid, which cannot "
    f"be downloaded at run time: download {FID_WEIGHTS_URL} once, then convert it with: "
    f"{CONVERT_COMMAND.format(out=path)}",
    CONVERT_COMMAND.format(out=path),
  )
  return from_flat(flat, path)


def random_params(seed: int = 0) -> Any:
  """Params of the right shapes with He-normal kernels and small biases: for tests and
  timings only (features of random weights mean nothing)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in expected_shapes().items():
    if key.endswith("kernel"):
      flat[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      flat[key] = rng.normal(size=shape) * 0.01
  return from_flat(flat, "random params")


def fingerprint(params: Any) -> str:
  """A short hash of the weights, stored with cached statistics so that features of
  different networks (e.g. random test weights) are never compared."""
  import hashlib  # noqa: PLC0415

  h = hashlib.sha256()
  for key, value in sorted(to_flat(params).items()):
    h.update(key.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()[:16]


def save_params(params: Any, path: str) -> None:
  """Writes params as .npz (local path or gs://), atomically."""
  flat = to_flat(params)
  check_params(flat, path)
  npz_files.save_npz(path, flat)
