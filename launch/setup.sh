#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine (or a Colab VM), from the repository root:
#
#   bash launch/setup.sh           the package and its core dependencies (train, evaluate,
#                                  sample, the tokenizer API; no TensorFlow, no torch)
#   bash launch/setup.sh --test    the same plus the test extras (TensorFlow, torch, lpips,
#                                  pytest, ...) and taming-transformers' reference modules
#   bash launch/setup.sh --onednn  the package plus oneDNN's CPU build (x86 Linux; needs g++):
#                                  faster CPU kernel gradients (models/onednn_kernel_grad.py);
#                                  --test includes it
#
# Everything goes into a virtual environment, .venv by default (VENV=DIR to choose another),
# made with python3 (PYTHON=... to choose another): Debian 12 and Ubuntu 24.04 refuse
# `pip install` into the system Python (PEP 668). Run the commands with .venv/bin/python, or
# `source .venv/bin/activate` first. Also installs Debian's Fashion-MNIST IDX files (apt, as
# root) when they are missing: the offline demo and the tests read them; and jemalloc
# (libjemalloc2), which the commands preload where it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
taming=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="${extras:+$extras,}test" taming=1 ;;
    --onednn) extras="${extras:+$extras,}onednn" ;;
    -h | --help)
      sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup.sh: unknown argument '$arg' (--test: the test extras; --onednn: oneDNN)" >&2
      exit 2
      ;;
  esac
done
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"

as_root_apt() {  # apt-get install "$@" where we are root; 1 otherwise
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  as_root_apt dataset-fashion-mnist ||
    echo "setup.sh: Fashion-MNIST IDX files missing: run 'sudo apt-get install" \
      "dataset-fashion-mnist', or put the four IDX files in a folder and pass" \
      "--config.data.path=DIR." >&2
fi

# jemalloc: the commands preload it where installed (arcvq_jax/host_memory.py): memory a train
# step frees is kept for the next one instead of being page-faulted in again (the VQ-VAE's CPU
# step ~1.1-1.2x faster). Optional: without it they run on glibc's malloc with huge pages.
if ! compgen -G '/usr/lib/*-linux-gnu/libjemalloc.so.2' >/dev/null; then  # Debian's multiarch dir
  as_root_apt libjemalloc2 ||
    echo "setup.sh: optional: 'sudo apt-get install libjemalloc2' makes the CPU train step" \
      "~1.1-1.2x faster (arcvq_jax/host_memory.py)." >&2
fi

if ! command -v "$python" >/dev/null; then
  as_root_apt python3 python3-venv || {
    echo "setup.sh: no $python: install Python >= 3.10 ('sudo apt-get install python3" \
      "python3-venv'), or name one with PYTHON=/path/to/python3." >&2
    exit 1
  }
fi
if [ ! -x "$venv/bin/python" ]; then
  # Debian/Ubuntu ship venv's pip bootstrap (ensurepip) separately, in python3-venv.
  if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    as_root_apt python3-venv && "$python" -m venv "$venv" || {
      echo "setup.sh: '$python -m venv $venv' failed: install the venv module" \
        "('sudo apt-get install python3-venv') and run this again." >&2
      exit 1
    }
  fi
fi
"$venv/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
if [ -n "$taming" ]; then
  # taming-transformers' own modules: the reference of the checkpoint-import parity tests.
  # --no-deps: its metadata pulls in pytorch-lightning, which neither we nor its modules need.
  "$venv/bin/python" -m pip install -q --no-deps taming-transformers-rom1504==0.0.6
fi
echo "setup.sh: ready; run commands with $venv/bin/python (or: source $venv/bin/activate)"
