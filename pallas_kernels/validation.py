"""Argument checks shared by every attention entry point.

Only static properties (ranks, shapes, dtypes) are checked: the values of
lengths, offsets and page ids are traced under `jax.jit` and cannot be
inspected here. Every error names the offending argument.
"""

import jax.numpy as jnp
import numpy as np


def _check_rank(name: str, x, rank: int, layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(
        f"`{name}` must have rank {rank} {layout}, got shape {tuple(x.shape)}.")


def _check_float(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`{name}` must be a floating dtype, got {x.dtype}.")


def _check_int32(name: str, x) -> None:
  if x.dtype != np.int32:
    raise ValueError(f"`{name}` must be int32, got {x.dtype}.")


def _check_heads(num_q_heads: int, num_kv_heads: int, k_name: str) -> None:
  if num_kv_heads == 0 or num_q_heads % num_kv_heads:
    raise ValueError(
        f"Number of query heads ({num_q_heads}) of `q` must be a multiple of "
        f"the number of KV heads ({num_kv_heads}) of `{k_name}`.")


def _check_pool(q, k_pages, v_pages) -> None:
  """q [..., q_heads, head_dim] against one layer of the page pool."""
  _check_rank("k_pages", k_pages, 4,
              "[kv_heads, num_pages, page_size, head_dim]")
  _check_rank("v_pages", v_pages, 4,
              "[kv_heads, num_pages, page_size, head_dim]")
  if k_pages.shape != v_pages.shape:
    raise ValueError(
        f"`v_pages` shape {tuple(v_pages.shape)} must equal `k_pages` shape "
        f"{tuple(k_pages.shape)}.")
  for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
    _check_float(name, x)
  if not q.dtype == k_pages.dtype == v_pages.dtype:
    raise ValueError(
        f"`q`, `k_pages` and `v_pages` must share a dtype, got {q.dtype}, "
        f"{k_pages.dtype} and {v_pages.dtype}.")
  num_q_heads, head_dim = q.shape[-2:]
  num_kv_heads, num_pages, page_size, kv_head_dim = k_pages.shape
  if kv_head_dim != head_dim:
    raise ValueError(
        f"Head dim of `k_pages` ({kv_head_dim}) must equal head dim of `q` "
        f"({head_dim}).")
  if num_pages == 0 or page_size == 0:
    raise ValueError(
        f"`k_pages` must hold at least one non-empty page, got shape "
        f"{tuple(k_pages.shape)}.")
  _check_heads(num_q_heads, num_kv_heads, "k_pages")


def _check_rows(name: str, x, rows: int, rows_of: str) -> None:
  _check_rank(name, x, 1, "[rows]")
  _check_int32(name, x)
  if x.shape[0] != rows:
    raise ValueError(f"`{name}` has {x.shape[0]} entries but {rows_of} has {rows}.")


def _check_tables(page_tables, rows: int, rows_of: str) -> None:
  _check_rank("page_tables", page_tables, 2, "[rows, max_pages]")
  _check_int32("page_tables", page_tables)
  if page_tables.shape[0] != rows:
    raise ValueError(
        f"`page_tables` has {page_tables.shape[0]} rows but {rows_of} has {rows}.")
  if page_tables.shape[1] == 0:
    raise ValueError("`page_tables` must have at least one column.")


def check_decode_args(q, k_pages, v_pages, lengths, page_tables) -> None:
  """Validates `paged_decode_attention` arguments; raises ValueError."""
  _check_rank("q", q, 3, "[batch, q_heads, head_dim]")
  _check_pool(q, k_pages, v_pages)
  _check_rows("lengths", lengths, q.shape[0], "the batch of `q`")
  _check_tables(page_tables, q.shape[0], "the batch of `q`")


def check_ragged_args(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables) -> None:
  """Validates `ragged_paged_attention` arguments; raises ValueError."""
  _check_rank("q", q, 3, "[tokens, q_heads, head_dim]")
  _check_pool(q, k_pages, v_pages)
  _check_rank("page_tables", page_tables, 2, "[rows, max_pages]")
  rows = page_tables.shape[0]
  for name, x in (("q_starts", q_starts), ("q_lens", q_lens), ("kv_lens", kv_lens)):
    _check_rows(name, x, rows, "`page_tables`")
  _check_tables(page_tables, rows, "`page_tables`")


def check_prefill_args(q, k, v, q_offsets, kv_lengths) -> None:
  """Validates `prefill_attention` arguments; raises ValueError."""
  _check_rank("q", q, 4, "[batch, q_len, q_heads, head_dim]")
  _check_rank("k", k, 4, "[batch, kv_len, kv_heads, head_dim]")
  _check_rank("v", v, 4, "[batch, kv_len, kv_heads, head_dim]")
  if k.shape != v.shape:
    raise ValueError(
        f"`v` shape {tuple(v.shape)} must equal `k` shape {tuple(k.shape)}.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_float(name, x)
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(
        f"`q`, `k` and `v` must share a dtype, got {q.dtype}, {k.dtype} and "
        f"{v.dtype}.")
  batch, _, num_q_heads, head_dim = q.shape
  kv_batch, _, num_kv_heads, kv_head_dim = k.shape
  if kv_batch != batch:
    raise ValueError(f"`k` has batch {kv_batch} but `q` has batch {batch}.")
  if kv_head_dim != head_dim:
    raise ValueError(
        f"Head dim of `k` ({kv_head_dim}) must equal head dim of `q` "
        f"({head_dim}).")
  _check_heads(num_q_heads, num_kv_heads, "k")
  for name, x in (("q_offsets", q_offsets), ("kv_lengths", kv_lengths)):
    _check_rank(name, x, 1, "[batch]")
    _check_int32(name, x)
    if x.shape[0] != batch:
      raise ValueError(
          f"`{name}` has {x.shape[0]} entries but `q` has batch {batch}.")


def default_scale(scale, head_dim: int) -> float:
  """`scale` if given, else 1/sqrt(head_dim); always a Python float."""
  return float(head_dim) ** -0.5 if scale is None else float(scale)


def is_power_of_2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0
