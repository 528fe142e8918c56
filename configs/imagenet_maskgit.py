"""MaskGIT's class-conditional transformer on ImageNet 256, over the 16x16 token grids of an
f16 tokenizer (K 1024; configs/imagenet_f16.py), at MaskGIT's published size.

google-research/maskgit's maskgit_class_cond_config and the paper: 24 layers, 768 wide, 16
heads, dropout 0.1 (SwiGLU 2048 wide: the parameters of its 3072-wide GELU MLP); cosine
masking schedule, cross-entropy on the masked tokens with label smoothing 0.1; AdamW lr 1e-4
with 5000 warm-up steps, betas (0.9, 0.96), weight decay 0.045, batch 256, 300 epochs
(1,501,200 steps); EMA 0.999; decoding in 8 steps, choice temperature 4.5. The network is
ours (docs/math.md, section 11.3 lists what departs from MaskGIT's BERT): 172M parameters.
MaskGIT samples without classifier-free guidance, so the label is never dropped here
(guidance.cond_drop_prob 0, guidance_scale 1); set --config.guidance.cond_drop_prob=0.1 to
train a model that guidance can steer.

  python -m arcvq_jax.tokenize --workdir=TOK --out=TOK_tokens --flip   # once
  CONFIG=configs/imagenet_maskgit.py WORKDIR=/data/runs/maskgit NPROC=8 bash launch/gpu_local.sh \
      --config.tokenizer_workdir=TOK --config.data.token_shards=TOK_tokens
  python -m arcvq_jax.sample --workdir=/data/runs/maskgit --num_samples=50000 --batch_size=250
  python -m arcvq_jax.evaluate_samples --samples=/data/runs/maskgit/samples/.../samples.npz \
      --reference_stats=VIRTUAL_imagenet256_labeled.npz --out=results.json

(Cloud TPU: `CONFIG=... WORKDIR=gs://... bash launch/tpu_vm.sh run --config....`; SLURM:
`sbatch launch/slurm_gpu.sbatch`, docs/scaling.md.)

Expected: not run here (no ImageNet and no accelerator where it was written). MaskGIT's
result to reproduce (paper, ImageNet 256, 8 steps): FID 6.18, IS 182.1 against the ADM
reference batch (docs/evaluation.md, "The protocol").
"""

from arcvq_jax import prior_config


def get_config():
  c = prior_config.maskgit_config()
  c.maskgit.dtype = "bfloat16"
  c.guidance.cond_drop_prob = 0.0
  c.sampling.guidance_scale = 1.0
  c.log_every_steps = 100
  c.sample_every_steps = 10000
  return c
