"""pdserve_jax: prefill/decode disaggregated LLM serving in pure JAX.

    import pdserve_jax as pdj
    model = pdj.load_hf(path, dtype="float32")
    logits = pdj.forward(model, tokens)
"""

from pdserve_jax.model.config import ModelConfig, RopeScaling, PRESETS, get_preset
from pdserve_jax.model.hf_io import load_hf, CheckpointError
from pdserve_jax.model.model import Model, forward, load, random_model, greedy_reference
from pdserve_jax.serving.params import SamplingParams
from pdserve_jax.serving.engine import Engine, EngineConfig, Result, RequestHandle
