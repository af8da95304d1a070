"""pdserve_jax: prefill/decode disaggregated LLM serving in pure JAX.

    import pdserve_jax as pdj
    model = pdj.load_hf(path, dtype="float32")
    logits = pdj.forward(model, tokens)

The names below load on first use (PEP 562), so `import pdserve_jax` alone does not
import jax: the planner, the simulator and config handling run without it, and
reading a preset or building `SamplingParams` stays cheap. A name whose module is
not present raises AttributeError when it is looked up, not at import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from pdserve_jax import tpu_probe

# Before jax initialises a backend: on a machine without a TPU, libtpu (if installed)
# would print errors on the first device query (see `tpu_probe`).
tpu_probe.skip_absent_tpu()

# name -> module that defines it.
_LAZY = {
    "ModelConfig": "pdserve_jax.model.config",
    "RopeScaling": "pdserve_jax.model.config",
    "PRESETS": "pdserve_jax.model.config",
    "get_preset": "pdserve_jax.model.config",
    "load_hf": "pdserve_jax.model.hf_io",
    "CheckpointError": "pdserve_jax.model.hf_io",
    "Model": "pdserve_jax.model.model",
    "forward": "pdserve_jax.model.model",
    "load": "pdserve_jax.model.model",
    "random_model": "pdserve_jax.model.model",
    "greedy_reference": "pdserve_jax.model.model",
    "Tokenizer": "pdserve_jax.model.tokenizer",
    "load_tokenizer": "pdserve_jax.model.tokenizer",
    "load_demo": "pdserve_jax.model.demo",
    "SamplingParams": "pdserve_jax.core.sampling",
    "Engine": "pdserve_jax.serving.engine",
    "EngineConfig": "pdserve_jax.serving.config",
    "EngineOverloaded": "pdserve_jax.serving.engine",
    "Result": "pdserve_jax.serving.engine",
    "Completion": "pdserve_jax.serving.engine",
    "RequestHandle": "pdserve_jax.serving.engine",
    "Colocated": "pdserve_jax.core.deploy",
    "Disaggregated": "pdserve_jax.core.deploy",
    "SemiPD": "pdserve_jax.core.deploy",
    "InstanceSpec": "pdserve_jax.core.deploy",
    "PartitionerConfig": "pdserve_jax.core.deploy",
    "ElasticConfig": "pdserve_jax.core.deploy",
    "ModelPartitionerConfig": "pdserve_jax.core.deploy",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # lets type checkers and IDEs see the names; never runs
  from pdserve_jax.model.config import ModelConfig, RopeScaling, PRESETS, get_preset
  from pdserve_jax.model.hf_io import load_hf, CheckpointError
  from pdserve_jax.model.model import Model, forward, load, random_model, greedy_reference
  from pdserve_jax.model.tokenizer import Tokenizer, load_tokenizer
  from pdserve_jax.model.demo import load_demo
  from pdserve_jax.core.sampling import SamplingParams
  from pdserve_jax.serving.config import EngineConfig
  from pdserve_jax.serving.engine import (Engine, EngineOverloaded, Result, Completion,
                                         RequestHandle)
  from pdserve_jax.core.deploy import (Colocated, Disaggregated, SemiPD, InstanceSpec,
                                       PartitionerConfig, ModelPartitionerConfig,
                                       ElasticConfig)


def __getattr__(name: str) -> Any:
  module_name = _LAZY.get(name)
  if module_name is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    # Only the defining module's own absence becomes AttributeError (so hasattr works);
    # a missing dependency inside it must surface as the ImportError it is.
    if e.name != module_name:
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} "
                         f"({module_name} is not available)") from e
  try:
    value = getattr(module, name)
  except AttributeError:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} "
                         f"({module_name} does not define it)") from None
  # Later lookups find it in the module dict and skip __getattr__.
  globals()[name] = value
  return value


def __dir__() -> List[str]:
  return sorted(set(globals()) | set(_LAZY))
