"""Model shapes: `ModelConfig` and named presets.

A config describes a decoder-only transformer's shape and numerics. `arch` says which
family it is: "llama" configs run in the engine; "opt" configs are shapes for the
simulator and planner only (parameter and KV-cache sizes, FLOPs). Knows nothing of
arrays or devices.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

EXECUTABLE_ARCHS = ("llama",)
KNOWN_ARCHS = ("llama", "opt")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 frequency-dependent RoPE scaling (HF rope_type "llama3")."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str
  arch: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v projection biases (Qwen2-style)

  def __post_init__(self):
    if self.arch not in KNOWN_ARCHS:
      raise ValueError(f"unknown architecture {self.arch!r}; known: {KNOWN_ARCHS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")

  @property
  def executable(self) -> bool:
    return self.arch in EXECUTABLE_ARCHS

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def num_params(self) -> int:
    """Parameter count (embeddings included once when tied)."""
    h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    qkv = h * self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
    out = self.num_heads * self.head_dim * h
    if self.arch == "llama":
      mlp = 3 * h * f  # gate, up, down
      norms = 2 * h
      bias = self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.attention_bias else 0
    else:  # OPT: fc1/fc2 with biases, LayerNorms with biases, learned positions.
      mlp = 2 * h * f + f + h
      norms = 4 * h
      bias = 4 * h
    per_layer = qkv + out + mlp + norms + bias
    embed = v * h * (1 if self.tie_word_embeddings else 2)
    if self.arch == "opt":
      embed += self.max_position_embeddings * h
    return self.num_layers * per_layer + embed + (h if self.arch == "llama" else 2 * h)

  def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token occupies across all layers."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

  def flops_per_token(self) -> int:
    """Matmul FLOPs per token for the weights (2 * non-embedding params + lm head)."""
    h = self.hidden_size
    per_layer = 2 * (h * self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
                     + self.num_heads * self.head_dim * h
                     + (3 if self.arch == "llama" else 2) * h * self.intermediate_size)
    return self.num_layers * per_layer + 2 * h * self.vocab_size

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _llama(name, v, h, f, l, nh, nkv, **kw):
  return ModelConfig(name=name, arch="llama", vocab_size=v, hidden_size=h, intermediate_size=f,
                     num_layers=l, num_heads=nh, num_kv_heads=nkv, head_dim=h // nh, **kw)


def _opt(name, h, l, nh):
  # OPT (arXiv 2205.01068, Table 1): ffn = 4h, vocab 50272, 2048 positions, tied LM head.
  return ModelConfig(name=name, arch="opt", vocab_size=50272, hidden_size=h,
                     intermediate_size=4 * h, num_layers=l, num_heads=nh, num_kv_heads=nh,
                     head_dim=h // nh, max_position_embeddings=2048,
                     tie_word_embeddings=True)


# Shapes from the published HF config.json files of each model.
PRESETS = {c.name: c for c in [
    # Tiny configs for tests and demos.
    _llama("tiny", 256, 64, 128, 2, 4, 2, max_position_embeddings=512),
    _llama("tiny-mha", 256, 64, 128, 2, 4, 4, max_position_embeddings=512),
    _llama("small", 512, 256, 512, 4, 8, 4, max_position_embeddings=2048),
    # Weights (~130 MB in float32) well beyond CPU caches, for timing studies on CPU.
    _llama("llama-30m", 8192, 512, 1408, 8, 8, 4, max_position_embeddings=2048),
    # ~100M parameters in float32 for the decode-step benchmark.
    _llama("llama-100m", 32000, 768, 2048, 12, 12, 4, max_position_embeddings=2048),
    _llama("llama2-7b", 32000, 4096, 11008, 32, 32, 32),
    _llama("llama2-13b", 32000, 5120, 13824, 40, 40, 40),
    _llama("llama2-70b", 32000, 8192, 28672, 80, 64, 8),
    _llama("llama3-8b", 128256, 4096, 14336, 32, 32, 8, max_position_embeddings=8192,
           rope_theta=500000.0),
    _llama("llama3-70b", 128256, 8192, 28672, 80, 64, 8, max_position_embeddings=8192,
           rope_theta=500000.0),
    # Llama 3.1 8B: Llama 3's shapes with a 128k context (its RoPE scaled, HF rope_type
    # "llama3"); holds every prompt of Mooncake's conversation trace.
    _llama("llama3.1-8b", 128256, 4096, 14336, 32, 32, 8, max_position_embeddings=131072,
           rope_theta=500000.0, rope_scaling=RopeScaling()),
    _opt("opt-13b", 5120, 40, 40),
    _opt("opt-66b", 9216, 64, 72),
    _opt("opt-175b", 12288, 96, 96),
]}


def get_preset(name: str) -> ModelConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


def config_to_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling"):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return ModelConfig(**d)
