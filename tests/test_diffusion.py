"""arcvq_jax/diffusion.py against closed forms: the schedule, q_sample, DDIM, guidance."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcvq_jax import diffusion


def test_linear_schedule_is_linear_in_sqrt_beta():
  s = diffusion.make_schedule("linear", 1000, 0.0015, 0.0195)
  T = 1000
  for t in (0, 1, 250, 500, 998, 999):
    # LDM's "linear": sqrt(beta) interpolates linearly from sqrt(start) to sqrt(end).
    want = (math.sqrt(0.0015) + t / (T - 1) * (math.sqrt(0.0195) - math.sqrt(0.0015))) ** 2
    assert s.betas[t] == pytest.approx(want, rel=1e-12)
  assert s.betas[0] == pytest.approx(0.0015, rel=1e-12)
  assert s.betas[-1] == pytest.approx(0.0195, rel=1e-12)
  # abar_t as an explicit product, in Python floats.
  prod = 1.0
  for t in range(T):
    prod *= 1.0 - s.betas[t]
    if t in (0, 10, 499, 999):
      assert s.alphas_cumprod[t] == pytest.approx(prod, rel=1e-12)
  # The sum of the betas has a closed form: sum (a + b t)^2 for t = 0..T-1.
  a, b = math.sqrt(0.0015), (math.sqrt(0.0195) - math.sqrt(0.0015)) / (T - 1)
  n = T - 1
  closed_sum = T * a * a + 2 * a * b * n * (n + 1) / 2 + b * b * n * (n + 1) * (2 * n + 1) / 6
  assert s.betas.sum() == pytest.approx(closed_sum, rel=1e-12)
  # The plain DDPM schedule is linear in beta.
  d = diffusion.make_schedule("sqrt_linear", 10, 1e-4, 2e-2)
  np.testing.assert_allclose(np.diff(d.betas), (2e-2 - 1e-4) / 9, rtol=1e-10)
  with pytest.raises(ValueError, match="not one of"):
    diffusion.make_schedule("cosine")


def test_q_sample_and_loss_of_the_true_noise():
  s = diffusion.make_schedule()
  key = jax.random.PRNGKey(0)
  x0 = jax.random.normal(key, (4, 5, 5, 3))
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.asarray([0, 10, 500, 999])
  got = diffusion.q_sample(s, x0, t, noise)
  ac = s.alphas_cumprod[np.asarray(t)][:, None, None, None]
  want = np.sqrt(ac) * np.asarray(x0) + np.sqrt(1 - ac) * np.asarray(noise)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

  # An oracle that reads the noise back from x_t (it knows x0) has zero loss.
  def oracle(x_t, t, labels):
    a = jnp.asarray(s.alphas_cumprod, jnp.float32)[t][:, None, None, None]
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  loss, aux = diffusion.eps_loss(jax.random.PRNGKey(2), oracle, x0, None, s)
  assert float(loss) < 1e-6 and aux["t"].shape == (4,)


def test_label_dropout_rate_and_values():
  labels = jnp.arange(20000) % 7
  dropped = diffusion.drop_labels(jax.random.PRNGKey(0), labels, 0.1, null_class=7)
  is_null = np.asarray(dropped == 7)
  assert abs(is_null.mean() - 0.1) < 0.01
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
  assert diffusion.drop_labels(jax.random.PRNGKey(0), labels, 0.0, 7) is labels


def test_ddim_timesteps_follow_ldm_uniform():
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 250)[:3], [1, 5, 9])
  assert diffusion.ddim_timesteps(1000, 250)[-1] == 997
  assert len(diffusion.ddim_timesteps(1000, 3)) == 3
  with pytest.raises(ValueError, match="DDIM steps"):
    diffusion.ddim_timesteps(1000, 0)


def _recovery_case(num_steps, dtype):
  """x0, the true noise and x_T at DDIM's first timestep."""
  s = diffusion.make_schedule()
  x0 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2), dtype)
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape, dtype)
  t_start = diffusion.ddim_timesteps(1000, num_steps)[-1]
  x_T = diffusion.q_sample(s, x0, jnp.full((3,), t_start), noise)
  return s, x0, noise, x_T


@pytest.mark.parametrize("num_steps", [1, 10, 250])
def test_ddim_with_the_true_noise_recovers_the_data_exactly(num_steps):
  # float64: exact to rounding. An eps_fn returning the true noise, one that infers it from
  # x_t (it knows x0), and LDM's last step to abar_0 (then the output is
  # sqrt(abar_0) x0 + sqrt(1 - abar_0) eps).
  with jax.enable_x64(True):
    s, x0, noise, x_T = _recovery_case(num_steps, jnp.float64)
    true_noise = lambda x, t, labels: noise

    def oracle(x_t, t, labels):
      a = jnp.asarray(s.alphas_cumprod)[t][:, None, None, None]
      return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    for eps_fn in (true_noise, oracle):
      out = diffusion.ddim_sample(eps_fn, x_T, None, s, num_steps=num_steps)
      assert out.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(out), np.asarray(x0), rtol=0, atol=1e-11)
    out = diffusion.ddim_sample(
      true_noise, x_T, None, s, num_steps=num_steps, final_alpha_one=False
    )
    a0 = s.alphas_cumprod[0]
    want = np.sqrt(a0) * np.asarray(x0) + np.sqrt(1 - a0) * np.asarray(noise)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-11)


def test_ddim_recovery_in_float32_within_its_conditioning():
  # In float32 the rounding of x_T is amplified by sqrt(abar_0 / abar_T) ~ 70 on the way
  # down (abar_997 ~ 2e-4): errors of a few 1e-5 are the format's, not the sampler's.
  s, x0, noise, x_T = _recovery_case(250, jnp.float32)
  sample = jax.jit(
    functools.partial(
      diffusion.ddim_sample, lambda x, t, y: noise, labels=None, schedule=s, num_steps=250
    )
  )
  np.testing.assert_allclose(np.asarray(sample(x_T)), np.asarray(x0), rtol=0, atol=1e-4)


def test_ddim_step_is_ddim_eq_12():
  rng = np.random.default_rng(0)
  x, eps, noise = (rng.normal(size=(2, 3)) for _ in range(3))
  a, a_prev, eta = 0.3, 0.6, 0.7
  sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  x_prev, x0 = diffusion.ddim_step(
    jnp.asarray(x), jnp.asarray(eps), a, a_prev, sigma, jnp.asarray(noise)
  )
  want_x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
  want = math.sqrt(a_prev) * want_x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise
  np.testing.assert_allclose(np.asarray(x0), want_x0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(x_prev), want, rtol=1e-5)
  coef = diffusion.ddim_coefficients(diffusion.make_schedule(), 10, eta=0.0)
  assert np.all(coef["sigma"] == 0) and coef["a_prev"][0] == 1.0


def _toy_conditional_eps(x, t, labels):
  """A deterministic, label- and t-dependent 'network' with a null class at 3."""
  shift = jnp.asarray([0.5, -1.0, 2.0, 0.0])[labels][:, None, None, None]
  return jnp.tanh(x + shift) * (1.0 + t[:, None, None, None] / 1000.0)


def test_guidance_scale_one_is_the_conditional_model():
  s = diffusion.make_schedule()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  t = jnp.asarray([3, 400, 999])
  labels = jnp.asarray([0, 1, 2])
  # The guided combination itself at scale 1 (forced through the doubled batch).
  eps_u = _toy_conditional_eps(x, t, jnp.full_like(labels, 3))
  eps_c = _toy_conditional_eps(x, t, labels)
  np.testing.assert_allclose(eps_u + 1.0 * (eps_c - eps_u), eps_c, atol=1e-6)
  got = diffusion.guided_eps(_toy_conditional_eps, x, t, labels, 1.0, null_class=3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(eps_c))
  # Scale w: eps_u + w (eps_c - eps_u), from the doubled batch.
  got = diffusion.guided_eps(_toy_conditional_eps, x, t, labels, 1.4, null_class=3)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(eps_u + 1.4 * (eps_c - eps_u)), rtol=1e-6, atol=1e-6
  )
  # Whole sampler: scale 1 equals sampling the conditional model with no guidance at all.
  x_T = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2))
  guided = diffusion.ddim_sample(
    _toy_conditional_eps, x_T, labels, s, num_steps=20, guidance_scale=1.0, null_class=3
  )
  cond_only = lambda x, t, y: _toy_conditional_eps(x, t, labels)
  plain = diffusion.ddim_sample(cond_only, x_T, None, s, num_steps=20)
  np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-6)
  # And a real guidance scale changes the samples.
  other = diffusion.ddim_sample(
    _toy_conditional_eps, x_T, labels, s, num_steps=20, guidance_scale=1.4, null_class=3
  )
  assert float(jnp.max(jnp.abs(other - guided))) > 1e-3


def test_ddim_is_deterministic_and_eta_needs_a_key():
  s = diffusion.make_schedule()
  x_T = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 2))
  labels = jnp.asarray([0, 1])
  run = jax.jit(
    functools.partial(
      diffusion.ddim_sample,
      _toy_conditional_eps,
      schedule=s,
      num_steps=8,
      guidance_scale=1.4,
      null_class=3,
    )
  )
  np.testing.assert_array_equal(np.asarray(run(x_T, labels)), np.asarray(run(x_T, labels)))
  with pytest.raises(ValueError, match="PRNG key"):
    diffusion.ddim_sample(_toy_conditional_eps, x_T, labels, s, num_steps=4, eta=1.0)
  noisy = diffusion.ddim_sample(
    _toy_conditional_eps,
    x_T,
    labels,
    s,
    num_steps=4,
    eta=1.0,
    key=jax.random.PRNGKey(0),
    null_class=3,
  )
  assert np.all(np.isfinite(np.asarray(noisy)))
