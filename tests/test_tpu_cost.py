"""The TPU cost-table latency model (`sim.latency.tpu_cost`) on a hand-made table:
bucket rounding, the max of compute and memory, efficiency factors, collectives,
pipeline stages, attention from contexts, the JSON through `latency_source`; and
one table built by compiling a tiny model for a small TPU topology
(`runtime.cost`), whose flops grow with tokens and with layers (XLA counts a
scanned loop's body once: the builder unrolls it). No timing of this machine.
"""

import copy
import importlib.util
import json

import pytest

from pdserve_jax.model.config import get_preset
from pdserve_jax.sim.hardware import get_hardware
from pdserve_jax.sim.latency import TpuCostLatencyModel, latency_source

MODEL = get_preset("tiny")  # 2 layers, 4 heads, 2 KV heads, head_dim 16
HW = get_hardware("v5e")
SHAPE = {"page_size": 16, "max_rows": 8, "max_step_tokens": 64, "max_seq_len": 128,
         "min_step_tokens": 16}


def _counts(flops, bytes_, coll=0.0, arg=0):
  return {"flops": flops, "bytes": bytes_, "transcendentals": 0.0,
          "collective_bytes": {"all-reduce": coll}, "argument_bytes": arg,
          "output_bytes": 0, "temp_bytes": 0, "code_bytes": 0}


def _row(size, base, layer):
  """A compiled point: `base` and `layer` are (flops, bytes, all-reduce bytes)."""
  at = lambda n: _counts(*(b + n * l for b, l in zip(base, layer)), arg=n * 1000)
  return {"size": size, "layers_1": at(1), "layers_2": at(2)}


def _table(coll=0.0):
  """Memory-bound counts (bytes / 819 GB/s >> flops / 197 TFLOP/s), linear in size."""
  rows = {"packed": [_row(16, (1e9, 1e9, 0), (1e9, 1e9, coll)),
                     _row(64, (4e9, 1.3e9, 0), (4e9, 1.3e9, 4 * coll))],
          "decode": [_row(1, (1e8, 1e9, 0), (1e8, 1e9, coll)),
                     _row(8, (8e8, 1.1e9, 0), (8e8, 1.1e9, 8 * coll))]}
  return {"kind": "tpu_cost", "model": "tiny", "topology": "v5e:2x2",
          "device_kind": "TPU v5 lite", "dtype": "bfloat16", "shape": SHAPE,
          "tp": {"1": rows, "2": copy.deepcopy(rows)}}


def _model(table=None, **kw):
  return TpuCostLatencyModel(table or _table(), MODEL, HW, **kw)


def test_decode_batch_rounds_up_to_its_bucket():
  m = _model()
  # Same context: 3 rows pad to the 4-row bucket; 5 rows to 8.
  assert m.decode_totals(3, 300) == pytest.approx(m.decode_totals(4, 300))
  assert m.decode_totals(5, 300) > m.decode_totals(4, 300)
  # Between compiled points (1 and 8) the counts lie on their line.
  c1, c4, c8 = (m._programs["decode"].counts(b, 2)["bytes"] for b in (1, 4, 8))
  assert c4 == pytest.approx(c1 + (c8 - c1) * 3 / 7)


def test_packed_tokens_round_up_and_split_into_calls():
  m = _model()
  one = m.call_time("packed", 32)
  # 17 and 32 tokens share the 32 bucket (attention aside: none here, no context).
  assert m.call_time("packed", m.shape.packed_shape(17)[0]) == one
  # The largest call holds the longest sequence, as the engine sizes it (the
  # tiny model's 512 positions, past the table's 64: on the last segment's line).
  assert m.shape.token_buckets[-1] == MODEL.max_position_embeddings
  assert m.call_time("packed", 512) > m.call_time("packed", 256) > m.call_time("packed", 64)
  # 600 tokens exceed a 512-token call: two calls, as the engine makes them.
  assert m.shape.step_calls([300, 300], 0)[0] == ((512,), (512,))
  assert m.prefill_totals(2, 600, 2 * 300 ** 2) > m.prefill_totals(1, 300, 300 ** 2) * 1.5


def test_time_is_the_max_of_compute_and_memory_at_the_efficiencies():
  m = _model(step_overhead_s=0.0)
  c = m._programs["decode"].counts(8, MODEL.num_layers)
  assert c["bytes"] / (HW.hbm_bandwidth * 0.8) > c["flops"] / (HW.peak_flops * 0.6)
  t = m.call_time("decode", 8)
  assert t == pytest.approx(c["bytes"] / (HW.hbm_bandwidth * 0.8))
  # Memory-bound: the MXU's efficiency does not matter, HBM's does.
  assert _model(step_overhead_s=0.0, mxu_efficiency=0.1).call_time("decode", 8) == t
  assert _model(step_overhead_s=0.0, hbm_efficiency=0.4).call_time(
      "decode", 8) == pytest.approx(2 * t)
  # Compute-bound once the MXU is slow enough.
  slow = _model(step_overhead_s=0.0, mxu_efficiency=1e-4)
  assert slow.call_time("decode", 8) == pytest.approx(
      c["flops"] / (HW.peak_flops * 1e-4))
  assert _model(step_overhead_s=0.01).decode_totals(8, 0) == pytest.approx(t + 0.01)
  assert set(m.parameters()) == {"mxu_efficiency", "hbm_efficiency", "ici_efficiency",
                                 "step_overhead_s"}
  with pytest.raises(ValueError, match="hbm_efficiency"):
    _model(hbm_efficiency=1.5)


def test_attention_grows_with_context():
  m = _model()
  assert m.decode_totals(8, 8 * 4096) > m.decode_totals(8, 8 * 16)
  # Prefill: the same tokens over a longer cached prefix attend more pairs.
  whole = m.prefill_time([64])
  late = m.prefill_time([4096 + 64], cached_lens=[4096])
  assert late > whole


def test_collectives_and_pipeline_stages():
  no, ar = _table(0.0), _table(1e8)
  t0 = _model(no, tp=2, step_overhead_s=0.0).call_time("decode", 8)
  t1 = _model(ar, tp=2, step_overhead_s=0.0).call_time("decode", 8)
  # 2 layers of 8e8 all-reduce bytes, a 2-device ring sending (2 * 1/2) of them.
  assert t1 - t0 == pytest.approx(2 * 8e8 / (HW.intra_node_bw * 0.7))
  # tp=1 has no ring to send over, whatever the table says.
  assert _model(ar, tp=1).call_time("decode", 8) == _model(no, tp=1).call_time("decode", 8)
  # Half the layers a stage (plus handing the hidden state on).
  assert _model(pp=2).decode_totals(8, 800) < _model(pp=1).decode_totals(8, 800)
  with pytest.raises(ValueError, match="no tp=4"):
    _model(tp=4)
  with pytest.raises(ValueError, match="does not divide"):
    _model(pp=3)


def test_json_through_latency_source(tmp_path):
  path = tmp_path / "tiny_tpu.json"
  path.write_text(json.dumps(_table()))
  source = latency_source(str(path), MODEL, HW, mxu_efficiency=0.5)
  m = source(2, 1)
  assert isinstance(m, TpuCostLatencyModel) and m.mxu_efficiency == 0.5
  assert m.decode_totals(4, 100) == _model(tp=2, mxu_efficiency=0.5).decode_totals(4, 100)
  assert source.parameters["mxu_efficiency"] == 0.5
  assert source.parameters["compiled_for"] == "TPU v5 lite"
  with pytest.raises(ValueError, match="not llama3-8b"):
    latency_source(str(path), get_preset("llama3-8b"), HW)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[test]')")
def test_built_table_grows_with_tokens_and_layers():
  """The tiny model's programs compiled for a v5e at 1 and 2 layers (unrolled):
  flops grow with tokens and rows, a layer adds flops (the scan counted once
  would add none) and at least its weights' bytes."""
  from jax.experimental import topologies

  from pdserve_jax.runtime.buckets import RunnerShape
  from pdserve_jax.runtime.cost import build_cost_table

  devices = topologies.get_topology_desc("v5e:2x2", "tpu").devices
  table = build_cost_table(MODEL, devices, "v5e:2x2", RunnerShape(**SHAPE), [1],
                           [16, 64], [1, 8])
  rows = table["tp"]["1"]
  for name in ("packed", "decode"):
    lo, hi = rows[name]
    assert hi["layers_1"]["flops"] > lo["layers_1"]["flops"] > 0
    for r in (lo, hi):
      one, two = r["layers_1"], r["layers_2"]
      layer_weights = two["argument_bytes"] - one["argument_bytes"]
      assert layer_weights > 0
      assert two["flops"] - one["flops"] > 0.2 * one["flops"]
  m = TpuCostLatencyModel(json.loads(json.dumps(table)), MODEL, HW)
  assert m.decode_totals(8, 8 * 100) > m.decode_totals(1, 100)
  assert m._programs["packed"].counts(64, 4)["flops"] > m._programs["packed"].counts(64, 2)[
      "flops"]
