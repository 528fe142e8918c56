#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine (or a Colab VM): the package with its
# test extras, and Debian's Fashion-MNIST IDX files for the offline demo and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "Fashion-MNIST IDX files missing: run 'sudo apt-get install dataset-fashion-mnist'," \
         "or put the four IDX files in a folder and pass --config.data.path=DIR." >&2
  fi
fi
python -m pip install -q -e '.[test]'
# taming-transformers' own modules: the reference of the checkpoint-import parity tests.
# --no-deps: its metadata pulls in pytorch-lightning, which neither we nor its modules need.
python -m pip install -q --no-deps taming-transformers-rom1504==0.0.6
