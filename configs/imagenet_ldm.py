"""Class-conditional latent diffusion on ImageNet 256 over the ArcVQ VQGAN f8 tokenizer,
paper Table 8 (latent-diffusion's cin-ldm-vq-f8 network).

Latents 32x32x16 (pre-quantisation; decoding quantises first), K 1024. UNet: 256 channels,
mult (1, 2, 4), 2 res blocks, spatial transformers at 32, 16, 8 (32 channels per head,
depth 1) with cross-attention to a learned 512-d class embedding (+ a null class, dropped
10 % of the time for guidance); 395M parameters. 1000 steps, LDM's linear schedule on
sqrt(beta) 0.0015 -> 0.0195, eps prediction; Adam 1e-5, batch 64, 1.2M steps, EMA 0.9999.
Sampling: DDIM 250 steps, eta 0, guidance 1.4.

  python -m arcvq_jax.main --config=configs/imagenet_ldm.py --workdir=LDM_DIR \
      --config.tokenizer_workdir=TOKENIZER_DIR [--config.unet.dtype=bfloat16]
  python -m arcvq_jax.sample --workdir=LDM_DIR --num_samples=50000

The images are the tokenizer run's own config.data (ImageNet train, centre crops); any
--config.data.KEY overrides it (e.g. data_dir on another machine).

Expected: not run for this project (no ImageNet and no accelerator where it was measured).
On 2 loaded CPU cores a train step took 17.6 s at batch 1 and DDIM sampling 27 min per image
(docs/performance.md, "Priors"): GPU / TPU work. The paper's result to reproduce (Table 3):
FID 6.79, IS 172.3, precision 0.75, recall 0.52.
"""

from arcvq_jax import prior_config


def get_config():
  c = prior_config.ldm_config()
  c.latents.encode_batch_size = 64
  c.log_every_steps = 100
  c.sample_every_steps = 0
  return c
