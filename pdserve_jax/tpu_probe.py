"""Keeps libtpu quiet on a machine without a TPU: jax is told to use its CPU there.

Why: with libtpu installed (the test extra's `jax[tpu]`, which compiles TPU programs
on a CPU machine) and no platform chosen, jax's first device query initialises every
backend it knows, the TPU one included. On a machine with no TPU, libtpu's plugin
initialisation writes its errors straight to the process's C++ stderr ("Failed to
find host bounds for accelerator type", TPU_WORKER_HOSTNAMES, "No jellyfish device
found", depending on the TPU_* variables set) before jax drops that backend and
carries on with the CPU. Python's logging cannot silence those lines, and libtpu's
variables only change which error it prints (`TPU_SKIP_MDS_QUERY`, which jax
already sets without a TPU, does not stop them).

So `skip_absent_tpu()` chooses the CPU platform, the one jax would have ended with,
when all of these hold: libtpu is installed; no platform was asked for
(`JAX_PLATFORMS` not set at all, `JAX_FORCE_TPU_INIT` not set, jax's `jax_platforms`
config unset); no device of Google's is on the PCI bus (where jax looks for TPU
chips); and no jax plugin (CUDA, ROCm, ...) is installed, so the CPU is the only other
backend. It sets `JAX_PLATFORMS=cpu` in the environment when jax is not loaded yet
(jax reads it on import; child processes on this machine would choose the same),
else jax's `jax_platforms` config. An explicit choice is never overridden:
`JAX_PLATFORMS=tpu` on such a machine still fails with libtpu's errors. Compile-only
TPU topologies (`jax.experimental.topologies.get_topology_desc`) load libtpu
themselves and work as before. Called by `import pdserve_jax`; imports no jax.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# Google's PCI vendor id, which TPU chips carry (jax._src.hardware_utils). Any device
# of Google's counts as a TPU here, not only the chip ids jax lists: a TPU generation
# newer than this list must never be switched to the CPU. A Google virtual NIC counts
# too, so a cloud VM with one keeps jax's default (and libtpu's lines).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def skip_absent_tpu() -> bool:
  """Chooses the CPU platform when libtpu would only print errors (see the module
  docstring); True when it did."""
  # JAX_PLATFORMS set, even to "" (jax's "choose automatically"), is a choice.
  if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
    return False
  jax = sys.modules.get("jax")
  if jax is not None and getattr(jax.config, "jax_platforms", None):
    return False
  if importlib.util.find_spec("libtpu") is None or _tpu_attached() or _jax_plugins():
    return False
  if jax is None:
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    jax.config.update("jax_platforms", "cpu")
  return True


def _tpu_attached() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _jax_plugins() -> bool:
  """Whether a PJRT plugin is installed, found the two ways jax finds them: the
  `jax_plugins` namespace package and the `jax_plugins` entry points."""
  from importlib import metadata

  return (importlib.util.find_spec("jax_plugins") is not None
          or bool(metadata.entry_points(group="jax_plugins")))
