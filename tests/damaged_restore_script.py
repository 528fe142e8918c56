"""Run by tests/test_checkpoint.py: restores from two checkpoint directories whose newest
step has a truncated array file (one through `Checkpointer.restore_latest`, one read-only
through `checkpoint_files.restore_newest_state`), then drops an object whose `__del__` raises.
In a fresh process, so that what reaches stderr is what a user would see."""

import gc
import glob
import os
import sys

import jax.numpy as jnp
import numpy as np

from arcvq_jax import checkpoint_files
from arcvq_jax.checkpoint import Checkpointer, abstract_like


def two_steps_the_newest_truncated(directory: str, state: dict) -> None:
  ckpt = Checkpointer(directory)
  for step in (1, 2):
    ckpt.save(step, {**state, "step": jnp.asarray(step)}, None)
  ckpt.wait()
  ckpt.close()
  files = glob.glob(os.path.join(directory, "2", "state", "ocdbt.process_0", "d", "*"))
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(100)


class Faulty:  # any other unraisable exception must still be printed
  def __del__(self):
    raise ValueError("not orbax")


if __name__ == "__main__":
  root = sys.argv[1]
  rng = np.random.default_rng(0)  # incompressible: one data file per array, many reads
  state = {f"w{i}": jnp.asarray(rng.normal(size=(32, 32)), jnp.float32) for i in range(40)}
  abstract = abstract_like({**state, "step": jnp.asarray(0)})
  for name in ("train", "read_only"):
    two_steps_the_newest_truncated(os.path.join(root, name), state)
  ckpt = Checkpointer(os.path.join(root, "train"))
  print("restored", int(ckpt.restore_latest(abstract, None)["step"]), flush=True)
  ckpt.close()
  _, step = checkpoint_files.restore_newest_state(os.path.join(root, "read_only"))
  print("restored", step, flush=True)
  gc.collect()  # the abandoned reads are closed here (the rest at exit)
  Faulty()
  gc.collect()
