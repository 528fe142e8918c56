"""The demo's second stage, latent diffusion's way: a class-conditional LDM over the
pre-quantisation latents of the demo tokenizer (configs/demo.py: 7x7x64 latents, K 512 codes,
on Fashion-MNIST), sampled with 50 DDIM steps.

The Table 8 UNet scaled down to minutes on a CPU: one level at 7x7 (no halving), 64
channels, 2 res blocks, a spatial transformer (2 heads of 32 channels) at 7 and in the middle
block with cross-attention to a 64-d class embedding (+ the null class: labels dropped 10 %
of the time, for guidance); 1000 steps of LDM's linear schedule, eps prediction, the latents
scaled to unit std. Adam lr 3e-4, batch 128, 600 steps (1.3 epochs), EMA 0.999; DDIM 50
steps, eta 0. Its tokenizer_expect is left open, so it takes any tokenizer's latents (and the
labels of its data, 10 classes).

  python -m arcvq_jax.main --config=configs/demo.py --workdir=/tmp/arcvq_demo
  python -m arcvq_jax.main --config=configs/demo_ldm.py --workdir=/tmp/arcvq_demo_ldm \
      --config.tokenizer_workdir=/tmp/arcvq_demo
  python -m arcvq_jax.sample --workdir=/tmp/arcvq_demo_ldm --num_samples=100 \
      [--guidance_scale=2 --ddim_steps=50]

The LDM trains on float latents, which token shards do not hold: the first run encodes the
training split once into WORKDIR/latents (config.latents.dir to share it between runs).
Expected on 2 cores of an AMD EPYC shared with other jobs: 0.7-1.05 steps/s (so about 10 min
for the 600 steps, after a pass over the images of under a minute), loss 0.86 at step 40;
500 samples in 82 s at guidance 1 (guidance runs a doubled batch). No quality figure here:
bench/compare_priors.py trains it beside the PixelCNN, MaskGIT and AR for the same minutes
and scores all four (docs/priors.md, "Comparing the priors").
"""

from arcvq_jax import prior_config


def get_config():
  c = prior_config.ldm_config()
  c.tokenizer_expect.num_codes = 0  # any tokenizer
  c.tokenizer_expect.latent_shape = ()
  c.num_classes = 10
  # 7x7 latents: one level (no halving), attention at 7 and in the middle block.
  c.unet.update(
    dict(
      model_channels=64,
      channel_mult=(1,),
      num_res_blocks=2,
      attention_resolutions=(7,),
      num_head_channels=32,
      context_dim=64,
    )
  )
  c.diffusion.scale_factor = 0.0  # 1 / std of the stored training latents
  c.optimizer.lr = 3e-4
  c.ema.decay = 0.999
  c.batch_size = 128
  c.num_train_steps = 600
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.sample_every_steps = 600  # a grid of samples (one per class) in TensorBoard at the end
  c.latents.encode_batch_size = 1000
  c.sampling.update(dict(ddim_steps=50, guidance_scale=1.0, batch_size=100, num_samples=100))
  return c
