"""`RooflineLatencyModel`: analytic step times from a `ModelConfig` and a
`HardwareSpec` (FLOPs and HBM bytes of weights, KV and activations, tensor-parallel
all-reduces), with named efficiency factors. Good for any model and hardware, only
as right as its efficiencies."""

from __future__ import annotations

import dataclasses

from pdserve_jax.model.config import ModelConfig
from pdserve_jax.sim.hardware import HardwareSpec
from pdserve_jax.sim.latency.base import LatencyModel


@dataclasses.dataclass(frozen=True)
class RooflineLatencyModel(LatencyModel):
  """Analytic step time of one instance of `tp` x `pp` devices.

  A step costs max(compute, memory) + tensor-parallel all-reduces + a fixed
  overhead, where compute is its matmul and attention FLOPs at
  `flops_efficiency` of peak, and memory is its HBM traffic (weights once, KV
  read and written, activations) at `bandwidth_efficiency` of peak. Megatron-style
  tensor parallelism all-reduces the hidden state twice a layer, over the node's
  link when the `tp` group fits in one node. Attention over a cached prefix in a
  chunked prefill is counted in FLOPs but not in KV bytes.
  """
  model: ModelConfig
  hardware: HardwareSpec
  tp: int = 1
  pp: int = 1
  dtype_bytes: int = 2
  flops_efficiency: float = 0.6
  bandwidth_efficiency: float = 0.8
  link_efficiency: float = 0.7
  collective_latency_s: float = 10e-6
  step_overhead_s: float = 2e-3
  # Hidden-size and ffn-size vectors each layer reads or writes per token.
  activation_hidden_rw: int = 6
  activation_ffn_rw: int = 2

  def __post_init__(self):
    if self.tp < 1 or self.pp < 1:
      raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
    for f in ("flops_efficiency", "bandwidth_efficiency", "link_efficiency"):
      if not 0 < getattr(self, f) <= 1:
        raise ValueError(f"{f} must lie in (0, 1], got {getattr(self, f)}")
    m, n = self.model, self.tp * self.pp
    lm = 2 * m.hidden_size * m.vocab_size
    link = self.hardware.link_bandwidth(self.tp <= self.hardware.devices_per_node)
    layer_bytes = m.hidden_size * self.dtype_bytes
    ring = 2 * (self.tp - 1) / self.tp
    consts = {
        "_body_flops": m.flops_per_token() - lm,  # per token, everything but lm head
        "_lm_flops": lm,
        # QK^T and PV: 2 FLOPs per multiply-add, 2 matmuls, per (query, key) pair.
        "_attn_flops": 4 * m.num_layers * m.num_heads * m.head_dim,
        "_weight_bytes": m.num_params() * self.dtype_bytes,
        "_kv_bytes": m.kv_bytes_per_token(self.dtype_bytes),
        "_act_bytes": m.num_layers * self.dtype_bytes * (
            self.activation_hidden_rw * m.hidden_size
            + self.activation_ffn_rw * m.intermediate_size),
        "_flops_rate": n * self.hardware.peak_flops * self.flops_efficiency,
        "_bytes_rate": n * self.hardware.hbm_bandwidth * self.bandwidth_efficiency,
        # All-reduce seconds per token and per call, over all layers, divided by pp.
        "_ar_per_token": (0.0 if self.tp == 1 else
                          2 * m.num_layers * ring * layer_bytes
                          / (link * self.link_efficiency) / self.pp),
        "_ar_fixed": (0.0 if self.tp == 1 else
                      2 * m.num_layers * self.collective_latency_s / self.pp),
        # Activations handed between stages, over the link.
        "_pp_per_token": ((self.pp - 1) * layer_bytes / (link * self.link_efficiency)
                          / self.pp),
    }
    for k, v in consts.items():
      object.__setattr__(self, k, v)

  def _time(self, flops, bytes_, tokens):
    return (max(flops / self._flops_rate, bytes_ / self._bytes_rate)
            + tokens * (self._ar_per_token + self._pp_per_token) + self._ar_fixed
            + self.step_overhead_s)

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    flops = self._body_flops * tokens + self._lm_flops * num_seqs + self._attn_flops * sq_tokens / 2
    bytes_ = self._weight_bytes + (self._kv_bytes + self._act_bytes) * tokens
    return self._time(flops, bytes_, tokens)

  def decode_totals(self, batch, context):
    flops = (self._body_flops + self._lm_flops) * batch + self._attn_flops * context
    bytes_ = self._weight_bytes + self._kv_bytes * (context + batch) + self._act_bytes * batch
    return self._time(flops, bytes_, batch)

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    flops = (self._body_flops * (tokens + batch) + self._lm_flops * (num_seqs + batch)
             + self._attn_flops * (sq_tokens / 2 + context))
    bytes_ = (self._weight_bytes + self._kv_bytes * (tokens + context + batch)
              + self._act_bytes * (tokens + batch))
    return self._time(flops, bytes_, tokens + batch)
