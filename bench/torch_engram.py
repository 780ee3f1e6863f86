"""A PyTorch Engram module in the official demo's layout: the baseline of bench_engram_layer.py.

Transcribed from the facts of the official module (DESIGN.md section 1 and the parity fixtures'
README), with the official parameter names, so that the official state dict (and
`engram_jax.convert.params_to_official`'s output) loads into it with `load_state_dict(strict=True)`:

  multi_head_embedding.embedding.weight [rows, head_dim]  one nn.Embedding for every head's rows
  multi_head_embedding.offsets          [H]               buffer: each head's first row
  value_proj.{weight [D, d_mem], bias}                    one shared value projection
  key_projs.{m}.{weight [D, d_mem], bias}                 one key projection per branch
  norm1.{m}.weight, norm2.{m}.weight                      RMSNorm of the key / of the hidden branch
  short_conv.norms.{m}.weight                             RMSNorm of each branch before the conv
  short_conv.conv.weight [M*D, 1, K]                      depthwise causal Conv1d, no bias

It computes the way the official module does, in plain eager ops: a per-branch Python loop for the
keys, norms and gates; `torch.nn.RMSNorm` with eps=None for the gate norms (machine epsilon of the
input dtype) and eps=1e-5 for the conv norms; the conv as `nn.Conv1d(groups=channels)` with
left+right padding `(K-1)*dilation` whose last outputs are cut off (causal); the table gradient is
nn.Embedding's default dense one. `forward(hidden [B,T,M,D], hash_ids [B,T,H])` returns [B,T,M,D],
the module's output before the caller's residual add, like `engram_jax.engram.Engram`.

This file imports torch; bench_engram_layer.py imports it only after checking torch is installed.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn


class MultiHeadEmbedding(nn.Module):
  """All heads' rows in one table; head h's id i reads row offsets[h] + i."""

  def __init__(self, head_sizes: Sequence[int], head_dim: int):
    super().__init__()
    sizes = [int(s) for s in head_sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    self.register_buffer("offsets", torch.from_numpy(offsets))
    self.embedding = nn.Embedding(sum(sizes), head_dim)

  def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:  # [B,T,H] -> [B,T,H,head_dim]
    return self.embedding(hash_ids + self.offsets)


class ShortConv(nn.Module):
  """Per-branch RMSNorm, branches concatenated on channels, depthwise causal conv, SiLU."""

  def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int, norm_eps: float = 1e-5):
    super().__init__()
    channels = hidden_size * hc_mult
    self.hc_mult = hc_mult
    self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False,
                          padding=(kernel_size - 1) * dilation, dilation=dilation)
    self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])
    self.act = nn.SiLU()

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,T,M,D] -> [B,T,M,D]
    B, T, M, D = x.shape
    normed = torch.cat([self.norms[m](x[:, :, m, :]) for m in range(M)], dim=-1)  # [B,T,M*D]
    y = self.conv(normed.transpose(1, 2))[..., :T]  # [B,M*D,T]: the first T outputs are the causal ones
    return self.act(y).transpose(1, 2).reshape(B, T, M, D)


class TorchEngram(nn.Module):
  """One Engram layer over `hc_mult` branches of width `hidden_size` (the official module's maths)."""

  def __init__(self, head_sizes: Sequence[int], head_dim: int, hidden_size: int, hc_mult: int,
               kernel_size: int = 4, max_ngram_size: int = 3, conv_norm_eps: float = 1e-5):
    super().__init__()
    d_mem = len(head_sizes) * head_dim
    self.hidden_size = hidden_size
    self.hc_mult = hc_mult
    self.multi_head_embedding = MultiHeadEmbedding(head_sizes, head_dim)
    self.short_conv = ShortConv(hidden_size, kernel_size, max_ngram_size, hc_mult, conv_norm_eps)
    self.value_proj = nn.Linear(d_mem, hidden_size)
    self.key_projs = nn.ModuleList([nn.Linear(d_mem, hidden_size) for _ in range(hc_mult)])
    self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])  # eps=None: dtype's eps
    self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])

  @classmethod
  def from_config(cls, cfg, layer_id: int, hidden_size: int, hc_mult: int) -> "TorchEngram":
    """Sizes from an `engram_jax.config.EngramConfig` (head table sizes as engram_jax computes them)."""
    from engram_jax.memory import table_layout

    sizes, _, _ = table_layout(cfg, layer_id)
    return cls(sizes.tolist(), cfg.head_dim, hidden_size, hc_mult, cfg.kernel_size, cfg.max_ngram_size,
               cfg.conv_norm_eps)

  def forward(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
    B, T = hash_ids.shape[:2]
    embeddings = self.multi_head_embedding(hash_ids).reshape(B, T, -1)  # [B,T,d_mem]
    gates = []
    for m in range(self.hc_mult):
      key = self.key_projs[m](embeddings)  # [B,T,D]
      normed_key = self.norm1[m](key)
      normed_query = self.norm2[m](hidden_states[:, :, m, :])
      gate = (normed_key * normed_query).sum(dim=-1) / math.sqrt(self.hidden_size)  # [B,T]
      gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
      gates.append(gate.sigmoid().unsqueeze(-1))
    gates = torch.stack(gates, dim=2)  # [B,T,M,1]
    value = gates * self.value_proj(embeddings).unsqueeze(2)  # [B,T,M,D]
    return value + self.short_conv(value)


def load_official(model: TorchEngram, state_dict: Mapping[str, np.ndarray]) -> TorchEngram:
  """Loads an official-layout state dict of numpy arrays (strict) into `model` (built on the meta
  device), which then lives on the CPU; move it with `.to(device, dtype)` afterwards.

  The model takes the arrays' storage (`assign=True`, no copy when the arrays are writable), so a
  table of billions of rows is never initialised just to be overwritten.
  """
  def tensor(v):
    v = np.ascontiguousarray(v)
    return torch.from_numpy(v if v.flags.writeable else v.copy())  # torch tensors must own writable memory

  tensors = {k: tensor(v) for k, v in state_dict.items()}
  model.load_state_dict(tensors, strict=True, assign=True)
  return model
