"""Run by tests/test_checkpoint.py: saves step 1, then is SIGKILLed in the middle of saving
step 2."""

import os
import signal
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np

from arcvq_jax.checkpoint import Checkpointer


def kill_when_tmp_appears(directory: str) -> None:
  while True:
    if any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory)):
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.0005)


if __name__ == "__main__":
  directory = sys.argv[1]
  ckpt = Checkpointer(directory, keep=3)
  state = {"w": jnp.asarray(np.arange(1000, dtype=np.float32)), "step": jnp.int32(1)}
  ckpt.save(1, state, None)
  ckpt.wait()
  # A state large enough that writing it takes a while (~256 MB).
  big = {
    "w": jnp.asarray(np.random.default_rng(0).normal(size=(64 * 2**20,)).astype(np.float32)),
    "step": jnp.int32(2),
  }
  threading.Thread(target=kill_when_tmp_appears, args=(directory,), daemon=True).start()
  ckpt.save(2, big, None)
  ckpt.wait()
  print("SAVE FINISHED BEFORE THE KILL")
