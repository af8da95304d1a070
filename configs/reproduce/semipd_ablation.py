"""Where semi-PD's gap to its paper goes: Llama-3-8B, from this library's model as
issue 21 found it (the conversation trace, stand-in SLOs, main's planned placements,
an idealised colocated engine, hard time-shared shares, our partitioner) to the
paper's 8B ShareGPT tight panel, one factor switched on per step: the paper's
setup, the baselines' engine costs, SM caps (100, 100) with the paper's curves,
the paper's partitioner. Prints semi-PD's ratio to each baseline after each step
(`pdserve_jax.cli.repro_semipd.ablation`)."""

from pdserve_jax.cli.repro_semipd import ablation


def get_config():
  return ablation()
