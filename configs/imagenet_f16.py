"""ArcVQ-VAE's VQGAN tokenizer on ImageNet 256x256, f16 (16x16 tokens), paper Table 2.

As configs/imagenet.py, with taming's f16 network: ch_mult (1, 1, 2, 2, 4), attention at
resolution 16 (and in the middle block).

  python -m arcvq_jax.main --config=configs/imagenet_f16.py --workdir=gs://BUCKET/run_f16 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.model.dtype=bfloat16

Expected: not run for this project (no ImageNet and no accelerator where it was measured).
The paper's result to reproduce (Table 2, ImageNet validation): codebook usage 99 %, rFID
1.63.
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqgan_config()
  c.model.ch_mult = (1, 1, 2, 2, 4)
  c.model.attn_resolutions = (16,)
  return config_lib.apply_variant(c, variant)
