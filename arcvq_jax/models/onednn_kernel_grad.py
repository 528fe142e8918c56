"""oneDNN's backward-weights convolution for the kernel gradients of `layers.conv_onednn`
(docs/architecture.md, "oneDNN convolutions").

XLA:CPU's custom calls reach oneDNN's forward convolution only (`models/onednn.py`), so the
kernel gradients of the wide layers ran on Eigen, behind transposes of both operands. PyTorch
runs them with oneDNN's backward-weights primitive; this module does too, through an XLA FFI
handler of our own (`onednn_kernel_grad.cc`) linked against the oneDNN of PyPI's
`onednn-cpu-gomp` wheel (jaxlib exports none of its own oneDNN symbols):

  pip install -e '.[onednn]'      # onednn-cpu-gomp + onednn-devel-cpu-gomp 2023.2; needs g++

On first use the handler is compiled (g++, about 5 s) into a cache directory
($XDG_CACHE_HOME/arcvq_jax, else ~/.cache/arcvq_jax; a file per source, oneDNN and jaxlib),
loaded and checked against XLA's own kernel gradient; later processes load the cached file.
`available()` says whether it runs here; where not (no extra, no compiler, another CPU), the
layers keep Eigen's kernel gradients and `unavailable_reason()` says why.

The handler runs on XLA's own intra-op threads (the FFI's thread pool): the batch in chunks,
one single-threaded oneDNN call each, the partial gradients summed. With oneDNN's GNU OpenMP
threads instead, beside XLA's busy ones on the same cores, the VQ-VAE's step gained 1.04x at
batch 1024 where this gains 1.24x (bench/bench_onednn_kernel_grad.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

TARGET = "arcvq_onednn_kernel_grad"
SYMBOL = "ArcvqOnednnKernelGrad"
# Chunks of the batch per XLA intra-op thread (the caller and its tasks take them in turn):
# one, and two, ran the VQ-VAE's step alike (batch 128); more make oneDNN's GEMMs smaller.
CHUNKS_PER_THREAD = 1
INSTALL = "pip install -e '.[onednn]' (onednn-cpu-gomp and onednn-devel-cpu-gomp 2023.2)"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_kernel_grad.cc")


def kernel_grad(x: Array, g: Array, kernel_shape, strides: tuple[int, int], pads: Pads) -> Array:
  """The kernel gradient of `lax.conv_general_dilated(x, kernel, strides, pads)` (NHWC, HWIO)
  for the cotangent g, by oneDNN's backward-weights convolution; needs `available()`.

  x: (B, H, W, Cin) float32; g: (B, H', W', Cout) float32; kernel_shape (kh, kw, Cin, Cout);
  pads ((top, bottom), (left, right)) zero padding. Returns (kh, kw, Cin, Cout) float32.
  """
  kh, kw, cin, cout = (int(n) for n in kernel_shape)
  (pt, pb), (pl, pr) = pads
  out_hw = tuple(
    (n + lo + hi - k) // s + 1
    for n, k, s, (lo, hi) in zip(x.shape[1:3], (kh, kw), strides, pads, strict=True)
  )
  if x.shape[-1] != cin or g.shape != (x.shape[0], *out_hw, cout):
    raise ValueError(
      f"kernel_grad: x {x.shape} and g {g.shape} do not fit a kernel {tuple(kernel_shape)} "
      f"at strides {strides}, pads {pads} (g should be {(x.shape[0], *out_hw, cout)})"
    )
  attrs = dict(zip(("sh", "sw", "pt", "pb", "pl", "pr"), (*strides, pt, pb, pl, pr), strict=True))
  attrs["chunks_per_thread"] = CHUNKS_PER_THREAD
  call = jax.ffi.ffi_call(
    TARGET, jax.ShapeDtypeStruct((kh, kw, cin, cout), jnp.float32), vmap_method="sequential"
  )
  return call(x, g, **{k: np.int64(v) for k, v in attrs.items()})


def available() -> bool:
  """Whether `kernel_grad` runs here: the handler is built, loaded and agrees with XLA's
  kernel gradient (once per process; the first call may compile it)."""
  return _load() is None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None where it is True)."""
  return _load()


@functools.cache
def _load() -> str | None:
  """Builds (or finds), loads, registers and checks the handler: None, or why not."""
  if jax.default_backend() != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
    return "oneDNN's kernel gradients are for x86 CPUs (the layers use them only there)"
  prefix = _onednn_prefix()
  if prefix is None:
    return f"oneDNN's headers and library are not installed: {INSTALL}"
  try:
    handler = _open(prefix)
  except RuntimeError as e:
    logging.warning("oneDNN kernel gradients off, Eigen's used: %s", e)
    return str(e)
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
  return _check()


def _open(prefix: str):
  """The handler's symbol from the cached (or newly built) library; a cached file that does
  not load is set aside (renamed *.damaged) and built again. RuntimeError where it fails."""
  library = _cached_build(prefix)
  try:
    return getattr(ctypes.CDLL(library), SYMBOL)
  except (OSError, AttributeError):
    os.replace(library, library + ".damaged")
  library = _cached_build(prefix)
  try:
    return getattr(ctypes.CDLL(library), SYMBOL)
  except (OSError, AttributeError) as e:
    raise RuntimeError(f"the handler {library} does not load: {e}") from e


def _onednn_prefix() -> str | None:
  """The prefix (sys.prefix, where the wheels put include/ and lib/) holding oneDNN."""
  header = os.path.join(sys.prefix, "include", "oneapi", "dnnl", "dnnl.hpp")
  lib = os.path.join(sys.prefix, "lib", "libdnnl.so")
  return sys.prefix if os.path.exists(header) and os.path.exists(lib) else None


def _cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "arcvq_jax")


def _cached_build(prefix: str) -> str:
  """The compiled handler's path: a cached file for this source, oneDNN and jaxlib, else
  compiled now (into a temporary name, then renamed: concurrent processes each write whole
  files). RuntimeError with the fix where it cannot be built."""
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++) to build the handler: apt install g++, or set CXX")
  lib = os.path.join(prefix, "lib")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  parts = (
    source,
    os.path.realpath(os.path.join(lib, "libdnnl.so")).encode(),
    jax.ffi.include_dir().encode(),
    importlib.metadata.version("jaxlib").encode(),
    compiler.encode(),
  )
  key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
  out_dir = _cache_dir()
  try:
    os.makedirs(out_dir, exist_ok=True)
    writable = os.access(out_dir, os.W_OK)
  except OSError:
    writable = False
  if not writable:  # a read-only home: this user's own temporary directory
    out_dir = os.path.join(tempfile.gettempdir(), f"arcvq_jax-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
  library = os.path.join(out_dir, f"onednn_kernel_grad-{key}.so")
  if os.path.exists(library):
    return library
  tmp = f"{library}.{os.getpid()}.tmp"
  cmd = [
    compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
    "-I", jax.ffi.include_dir(), "-I", os.path.join(prefix, "include"), _SOURCE,
    "-L", lib, "-ldnnl", f"-Wl,-rpath,{lib}", "-o", tmp,
  ]  # fmt: skip
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise RuntimeError(f"building the handler with {compiler} failed: {e}") from e
  if done.returncode != 0:
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"building the handler failed ({' '.join(cmd)}):\n{tail}")
  os.replace(tmp, library)
  return library


def _check() -> str | None:
  """Runs one small strided, unevenly padded kernel gradient against XLA's own."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  g = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
  shape, strides, pads = (3, 3, 3, 5), (2, 2), ((1, 2), (0, 1))
  conv = lambda k: lax.conv_general_dilated(
    x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  # Called while a model is traced: evaluate here, do not stage into the caller's program.
  with jax.ensure_compile_time_eval():
    try:
      got = np.asarray(jax.jit(lambda x, g: kernel_grad(x, g, shape, strides, pads))(x, g))
    except Exception as e:  # any failure to run the handler means "not here"
      return f"the handler does not run: {e}"
    want = np.asarray(jax.vjp(conv, jnp.zeros(shape, jnp.float32))[1](g)[0])
  if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
    return "the handler's kernel gradient differs from XLA's"
  return None
