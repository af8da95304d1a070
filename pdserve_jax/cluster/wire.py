"""The wire format between the router and its workers: one JSON object per message.

Commands carry an `op`, an `id` the reply echoes and their arguments; replies carry
`ok` and either the result or an `error` string. Rows travel as lists: tokens,
positions, page tables, sampling rows in; sampled tokens and log-probabilities out.
No jax here (the router never loads it).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from pdserve_jax.runtime.rows import Sampled, SamplingRows


def encode(msg: dict) -> bytes:
  return json.dumps(msg, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict:
  return json.loads(raw)


def sampled_json(rows: dict) -> dict:
  """A call's sampled rows (host arrays by `Sampled` field), as lists."""
  return {k: np.asarray(v).tolist() for k, v in rows.items()}


def sampled_from_json(reply: dict) -> Sampled:
  n = len(reply["tokens"])
  return Sampled(np.asarray(reply["tokens"], np.int32),
                 np.asarray(reply["logprobs"], np.float32),
                 np.asarray(reply["top_ids"], np.int32).reshape(n, -1),
                 np.asarray(reply["top_logprobs"], np.float32).reshape(n, -1))


def sampling_to_json(rows: SamplingRows) -> dict:
  return {f.name: getattr(rows, f.name).tolist() for f in dataclasses.fields(rows)}


def sampling_from_json(d: dict) -> SamplingRows:
  return SamplingRows(np.array(d["temperature"], np.float32), np.array(d["top_k"], np.int32),
                      np.array(d["top_p"], np.float32), np.array(d["seed"], np.int32),
                      np.array(d["token_index"], np.int32))


def spec_json(spec) -> dict:
  """An `InstanceSpec` as a JSON object."""
  return dataclasses.asdict(spec)
