"""ArcVQ-VAE's VQGAN tokenizer on ImageNet 256x256, f8 (32x32 tokens), paper Table 7 / Table 2.

taming-transformers' VQGAN (ch 128, ch_mult (1, 2, 2, 4), attention at 32 and in the middle
block), K 1024, D 16, ArcLoss (s 10, m 0.1, top-k 3, gamma0 1, lambda 1e-4), BBNR alpha 1e-5,
L1 + LPIPS + PatchGAN (disc_start 250001), Adam (0.5, 0.9) at 4.5e-6 x 30, batch 30, 15 epochs.

Data: TFDS `imagenet2012` as ArrayRecord, prepared once from the manual download
(ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in TARS):
  python -m arcvq_jax.data.imagenet --manual_dir=TARS --data_dir=DIR
LPIPS weights, converted once: docs/evaluation.md, "Weights".

  python -m arcvq_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/run \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.model.dtype=bfloat16

Expected: not run for this project (no ImageNet and no accelerator where it was measured).
On 2 cores of an AMD EPYC the generator step alone takes 8.5-8.8 s at batch 1
(docs/performance.md, "The VQGAN step"): this is GPU / TPU work. The paper's result to
reproduce (Table 2, ImageNet validation): codebook usage 88 %, rFID 0.95.
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqgan_config()
  return config_lib.apply_variant(c, variant)
