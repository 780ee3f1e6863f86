"""Conversion between the official PyTorch Engram state dict and this package's Engram params.

Official names (M branches): `multi_head_embedding.embedding.weight` [rows, d] (+ the `offsets`
buffer), `value_proj.{weight [D, d_mem], bias}`, `key_projs.{m}.{weight, bias}`, `norm1.{m}.weight`
(key norm), `norm2.{m}.weight` (query norm), `short_conv.norms.{m}.weight`, `short_conv.conv.weight`
[M*D, 1, K]. torch Linear weights are [out, in]; ours are [in, out].
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.memory import table_layout


def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor, without importing torch
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def official_to_params(state_dict: Mapping[str, Any], cfg: EngramConfig, layer_id: int, num_branches: int,
                       dtype=np.float32) -> Tuple[Dict[str, Any], np.ndarray]:
  """Official state dict -> (the `params` of one `engram.Engram` module, the layer's table [rows, d]
  padded as memory.table_layout says; memory.merge puts it into a model's parameters)."""
  sd = {k: _np(v) for k, v in state_dict.items()}
  M = num_branches
  required = ["multi_head_embedding.embedding.weight", "value_proj.weight", "value_proj.bias",
              "short_conv.conv.weight"] + [f"{p}.{m}.{s}" for m in range(M) for p, s in (
                  ("key_projs", "weight"), ("key_projs", "bias"), ("norm1", "weight"), ("norm2", "weight"),
                  ("short_conv.norms", "weight"))]
  missing = [k for k in required if k not in sd]
  if missing:
    raise KeyError(f"official state dict lacks {missing} (expected the Engram module of the official demo with {M} branches)")
  sizes, offsets, rows = table_layout(cfg, layer_id)
  emb = sd["multi_head_embedding.embedding.weight"]
  if emb.shape != (int(sizes.sum()), cfg.head_dim):
    raise ValueError(f"multi_head_embedding.embedding.weight has shape {emb.shape}; the config gives "
                     f"{(int(sizes.sum()), cfg.head_dim)} (sum of the prime head sizes {sizes.tolist()}, head width)")
  if "multi_head_embedding.offsets" in sd and not np.array_equal(sd["multi_head_embedding.offsets"], offsets):
    raise ValueError(f"official head offsets {sd['multi_head_embedding.offsets'].tolist()} differ from the "
                     f"config's {offsets.tolist()}: the state dict was built with another Engram config")
  table = np.zeros((rows, cfg.head_dim), emb.dtype)
  table[:emb.shape[0]] = emb
  conv = sd["short_conv.conv.weight"]  # [M*D, 1, K]
  D = sd["value_proj.weight"].shape[0]
  stack = lambda fmt: np.stack([sd[fmt.format(m)] for m in range(M)])  # noqa: E731
  params = {
      "key_proj": stack("key_projs.{}.weight").transpose(0, 2, 1),  # [M, d_mem, D]
      "key_bias": stack("key_projs.{}.bias"),
      "value_proj": sd["value_proj.weight"].T,
      "value_bias": sd["value_proj.bias"],
      "key_norm": stack("norm1.{}.weight"),
      "query_norm": stack("norm2.{}.weight"),
      "conv_norm": stack("short_conv.norms.{}.weight"),
      "conv_kernel": conv[:, 0, :].T.reshape(conv.shape[-1], M, D),  # [K, M, D]
  }
  return _cast(params, dtype), table.astype(dtype)


def params_to_official(params: Mapping[str, Any], table, cfg: EngramConfig, layer_id: int) -> Dict[str, np.ndarray]:
  """One `engram.Engram` module's `params` and its layer's table -> the official state dict (numpy)."""
  p = {k: _np(v) for k, v in params.items()}
  sizes, offsets, _ = table_layout(cfg, layer_id)
  table = _np(table)[:int(sizes.sum())]
  K, M, D = p["conv_kernel"].shape
  sd = {
      "multi_head_embedding.offsets": offsets.copy(),
      "multi_head_embedding.embedding.weight": table,
      "value_proj.weight": p["value_proj"].T,
      "value_proj.bias": p["value_bias"],
      "short_conv.conv.weight": p["conv_kernel"].reshape(K, M * D).T[:, None, :],
  }
  for m in range(M):
    sd[f"key_projs.{m}.weight"] = p["key_proj"][m].T
    sd[f"key_projs.{m}.bias"] = p["key_bias"][m]
    sd[f"norm1.{m}.weight"] = p["key_norm"][m]
    sd[f"norm2.{m}.weight"] = p["query_norm"][m]
    sd[f"short_conv.norms.{m}.weight"] = p["conv_norm"][m]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return np.asarray(tree, dtype=dtype)
