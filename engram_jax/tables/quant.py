"""Quantized table rows: the storage kinds, quantize on the host, dequantize (host or in-graph).

Host and disk tables may store rows as float32, bfloat16, int8 or float8_e4m3 (int8 and float8
with one float32 scale per row: the row's largest magnitude over the kind's largest value). Rows
cross to the devices in their stored kind and are dequantized there, after the gather.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

QUANTIZATIONS = ("float32", "bfloat16", "int8", "float8_e4m3")
STORAGE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "int8": np.dtype(np.int8), "float8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn)}
SCALED = ("int8", "float8_e4m3")  # the kinds stored with a float32 scale per row
QMAX = {"int8": 127.0, "float8_e4m3": float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}  # 448


def check_quantize(kind: str) -> str:
  if kind not in QUANTIZATIONS:
    raise ValueError(f"quantize={kind!r}: expected one of {QUANTIZATIONS}")
  return kind


def quantize_rows(rows: np.ndarray, kind: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """float rows [n, d] -> (stored rows [n, d] in the storage dtype, float32 scale [n] or None).

  Error bounds per element x of a row whose largest magnitude is a (so scale s = a / qmax), for
  the dequantized value (`dequantize`), round to nearest:
    bfloat16:     |err| <= 2^-8 |x|          (8 significand bits)
    int8:         |err| <= s / 2 = a / 254   (s = a / 127; values -127..127)
    float8_e4m3:  |err| <= 2^-4 |x| + 2^-10 s (3 mantissa bits; s = a / 448; the second term is the
                  subnormal range, |x / s| < 2^-6)
  plus float32 rounding of x / s and of the product (a few ulps of x). tests/test_offload.py checks
  these bounds on random rows.
  """
  check_quantize(kind)
  rows = np.asarray(rows, np.float32)
  if kind == "float32":
    return np.ascontiguousarray(rows), None
  if kind == "bfloat16":
    return rows.astype(STORAGE[kind]), None
  amax = np.max(np.abs(rows), axis=-1)
  scale = (amax / np.float32(QMAX[kind])).astype(np.float32)
  safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
  if kind == "int8":
    q = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
  else:
    q = np.clip(rows / safe, -QMAX[kind], QMAX[kind]).astype(STORAGE[kind])
  return q, scale


def dequantize(stored, scale, dtype):
  """Stored rows [..., d] (and scales [...] for int8 / float8) -> rows in `dtype` (numpy or jnp)."""
  xp = jnp if isinstance(stored, jax.Array) or isinstance(scale, jax.Array) else np
  rows = stored.astype(xp.float32)
  if scale is not None:
    rows = rows * scale[..., None].astype(xp.float32)
  return rows.astype(dtype)


def bytes_per_row(kind: str, dim: int) -> int:
  """Bytes one table row takes in storage (and on the way to the device) under `kind`."""
  return STORAGE[check_quantize(kind)].itemsize * dim + (4 if kind in SCALED else 0)
