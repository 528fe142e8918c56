"""LlamaGen's class-conditional autoregressive transformer on ImageNet 256, over the 16x16
token grids of an f16 tokenizer (K 1024; configs/imagenet_f16.py). Variants: `b`
(LlamaGen-B: 12 layers, 768 wide, 12 heads, 111M parameters with LlamaGen's 16,384 codes)
and `l` (LlamaGen-L: 24 layers, 1024 wide, 16 heads, 343M).

FoundationVision/LlamaGen's train_c2i.py and GPT: class token prefix, 2D RoPE, RMSNorm,
SwiGLU, dropout 0.1 (token, residual, feed-forward), the label dropped 10 % of the time for
guidance; AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on matrices and embeddings
only, gradient clipping 1.0, batch 256, 300 epochs (1,501,200 steps), bf16. Sampling as its
FID runs (sample_c2i_ddp.py, GETTING_STARTED.md): top-k 0, top-p 1, temperature 1,
classifier-free guidance 2.0 for both B and L. LlamaGen trains without an EMA by default;
one (0.9999) is kept here, but samples come from the trained weights as LlamaGen's do.

  python -m arcvq_jax.tokenize --workdir=TOK --out=TOK_tokens --flip   # once
  CONFIG=configs/imagenet_ar.py:l WORKDIR=/data/runs/ar_l NPROC=8 bash launch/gpu_local.sh \
      --config.tokenizer_workdir=TOK --config.data.token_shards=TOK_tokens
  python -m arcvq_jax.sample --workdir=/data/runs/ar_l --num_samples=50000 --batch_size=250
  python -m arcvq_jax.evaluate_samples --samples=/data/runs/ar_l/samples/.../samples.npz \
      --reference_stats=VIRTUAL_imagenet256_labeled.npz --out=results.json

(Cloud TPU: `CONFIG=... WORKDIR=gs://... bash launch/tpu_vm.sh run --config....`; SLURM:
`sbatch launch/slurm_gpu.sbatch`; an 'fsdp' mesh axis for the state:
--config.sharding.mesh_shape='(-1, 4)' --config.sharding.mesh_axes='("data", "fsdp")',
docs/scaling.md.)

Expected: not run here (no ImageNet and no accelerator where it was written). LlamaGen's
results to reproduce (its README, 16x16 tokens of its own VQ tokenizer with 16,384 codes,
ADM's evaluator): FID 5.46 (B), 3.80 (L).
"""

from arcvq_jax import prior_config


def get_config(variant: str = "b"):
  sizes = {"b": (768, 12, 12), "l": (1024, 24, 16)}
  if variant not in sizes:
    raise ValueError(
      f"unknown variant {variant!r}: choose one of {sorted(sizes)} "
      "(e.g. --config=configs/imagenet_ar.py:l)"
    )
  c = prior_config.ar_config()
  dim, depth, heads = sizes[variant]
  c.ar.update(dict(dim=dim, depth=depth, num_heads=heads, dtype="bfloat16"))
  c.sampling.update(dict(guidance_scale=2.0, top_k=0, top_p=1.0, use_ema=False))
  c.log_every_steps = 100
  c.sample_every_steps = 10000
  return c
