"""The reproductions of the papers' headline figures (`pdserve_jax.cli.reproduce`).

  python -m pdserve_jax.cli.reproduce                       # all of configs/reproduce/
  python -m pdserve_jax.cli.reproduce --config.experiments=distserve_fig1,semipd_ablation

Each experiment is a file in `experiments_dir`; the knobs here apply to all of them.
"""

import os

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.experiments = "all"  # or comma-separated names of files in experiments_dir
  c.experiments_dir = os.path.join(os.path.dirname(__file__), "reproduce")  # beside this file
  # Goodput over workload seeds 0, 1, ...: at least min_seeds, more until the 95%
  # interval of the mean is within max_spread of it, at most max_seeds.
  c.min_seeds = 3
  c.max_seeds = 24
  c.max_spread = 0.05
  c.num_requests = 0  # requests per seed; 0: each experiment's own
  c.curve_seeds = 3  # seeds averaged per point of the attainment curves
  return c
