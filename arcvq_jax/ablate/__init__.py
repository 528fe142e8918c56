"""The ablation lab: one command trains quantizers on one budget and writes the comparison.

  python -m arcvq_jax.ablate --config=configs/fashion_mnist.py --sweep=configs/sweeps/zoo.py \
      --workdir=DIR [--shard=i/n] [--config.KEY=VALUE ...] [--sweep.KEY=VALUE ...]
  python -m arcvq_jax.ablate --report --workdir=DIR

sweep.py: the sweep file, its settings and runs, each run's config; runner.py: training and
evaluating the runs (resumable, failures recorded); report.py: results.json / results.md;
plots.py: the figures; events.py: TensorBoard scalars without TensorFlow; __main__.py: the
command line.
"""
