"""Hugging Face Qwen4Exp checkpoints -> (config, params, PLE tables) of `models.qwen4exp`.

Reads what `save_pretrained` writes: config.json and safetensors files (one, or several with their
`model.safetensors.index.json`). The text model's keys sit under `model.` (`Qwen4ExpForCausalLM`) or
`model.language_model.` (`Qwen4ExpForConditionalGeneration`, which adds `model.visual.*`, ignored
here, as are the multi-token-prediction `mtp.*` weights). Experts are stored one module per expert;
the PLE table as `...ple_embedding.ngram_embedding.shard_{j}.weight`, concatenated in numeric order of
j (shard_2 before shard_11); its int64 buffers (multipliers, head sizes, offsets) are compared with
the recomputed `hashing.ple_recipe` and a difference is an error naming the tensor and both values:
rows hashed by another recipe would be read at the wrong addresses without any other symptom.

Safetensors are parsed here (an 8-byte little-endian header length, a JSON header of dtypes, shapes
and byte offsets, then the raw buffers) and memory-mapped, so a tensor is read when it is converted
and a table shard never has to be in RAM with the rest.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Mapping, Tuple

import ml_dtypes
import numpy as np

from engram_jax import memory
from engram_jax.models.qwen4exp import Qwen4ExpConfig, stack_layers

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_PREFIXES = ("model.language_model.", "model.")
_IGNORED = (re.compile(r"^mtp\."), re.compile(r"^model\.visual\."))
_SHARD = re.compile(r"^layers\.(\d+)\.ple\.ple_embedding\.ngram_embedding\.shard_(\d+)\.weight$")


class ConversionError(ValueError):
  """A checkpoint that does not convert; the message names the file, tensor or value."""


# ----------------------------------------------------------------------------------------------
# Safetensors.


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """{name: array} of one .safetensors file, memory-mapped (read-only views, no copy)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: {size} bytes, too short to be a safetensors file")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise ConversionError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ConversionError(f"{path}: the safetensors header is not JSON ({e})") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    start, stop = info["data_offsets"]
    shape = tuple(info["shape"])
    if stop > data.size or stop - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ConversionError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) at bytes [{start}, {stop}) does "
                            f"not fit the file's {data.size} data bytes: the file is truncated or damaged")
    out[name] = data[start:stop].view(dtype).reshape(shape)
  return out


def read_hf_dir(hf_dir: str) -> Tuple[dict, Dict[str, np.ndarray]]:
  """(config.json as a dict, every tensor of the directory's safetensors) for a save_pretrained dir."""
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ConversionError(f"{hf_dir}: no config.json (expected a Hugging Face save_pretrained directory)")
  with open(config_path) as f:
    config = json.load(f)
  index_path = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    weight_map = None
  if not files:
    raise ConversionError(f"{hf_dir}: no .safetensors files")
  state: Dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    if not os.path.isfile(path):
      raise ConversionError(f"{index_path} names {name}, which is missing from {hf_dir}")
    state.update(read_safetensors(path))
  if weight_map is not None:
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ConversionError(f"{index_path} lists {len(missing)} tensors no file holds, e.g. {missing[:3]}")
  return config, state


# ----------------------------------------------------------------------------------------------
# State dict -> params and tables.


def _text_state(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The text model's tensors with their prefix removed (`lm_head.weight` kept as is)."""
  for prefix in _PREFIXES:
    if prefix + "embed_tokens.weight" in state:
      break
  else:
    raise ConversionError(f"no embed_tokens.weight under {' or '.join(_PREFIXES)}: not a Qwen4Exp text checkpoint "
                          f"(first keys: {sorted(state)[:4]})")
  out = {}
  for key, value in state.items():
    if key.startswith(prefix) and not any(p.match(key) for p in _IGNORED):
      out[key[len(prefix):]] = value
    elif key == "lm_head.weight":
      out[key] = value
    elif not any(p.match(key) for p in _IGNORED):
      raise ConversionError(f"unexpected tensor {key!r} outside the text model ({prefix!r}), lm_head, mtp or visual")
  return out


_PARAM = object()  # "in the params' dtype"


class _Reader:
  """Takes tensors by name, in the params' dtype (or as stored, dtype=None), and remembers which were
  used."""

  def __init__(self, state: Dict[str, np.ndarray], dtype):
    self.state, self.used, self.dtype = state, set(), dtype

  def __call__(self, key: str, shape=None, dtype=_PARAM) -> np.ndarray:
    if key not in self.state:
      raise ConversionError(f"missing tensor {key!r}")
    value = self.state[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(f"tensor {key!r} has shape {list(value.shape)}; the config implies {list(shape)}")
    self.used.add(key)
    dtype = self.dtype if dtype is _PARAM else dtype
    return np.asarray(value, dtype) if dtype is not None else np.asarray(value)

  def has(self, key: str) -> bool:
    return key in self.state


def _hyper_connection(take: _Reader, prefix: str, cfg: Qwen4ExpConfig, combine: bool) -> dict:
  M, H, r = cfg.hc_count, cfg.hidden_size, cfg.hc_lowrank
  out = {"hc_norm": take(f"{prefix}.hc_norm.weight", (M * H,)).reshape(M, H),
         "mix_down": take(f"{prefix}.input_mix_weight_down.weight", (r, M * H)).T.reshape(M, H, r),
         "mix_up": take(f"{prefix}.input_mix_weight_up.weight", (M * H, r)).T.reshape(r, M, H)}
  if combine:
    out["inject"] = take(f"{prefix}.block_inject_weight.weight", (M, M * H)).T.reshape(M, H, M)
  return out


def _linear_attention(take: _Reader, p: str, cfg: Qwen4ExpConfig) -> dict:
  H, K = cfg.hidden_size, cfg.linear_conv_kernel_dim
  nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                    cfg.linear_value_head_dim)
  kd, vd = nk * dk, nv * dv
  qkv = take(f"{p}.in_proj_qkv.weight", (2 * kd + vd, H)).T  # [H, q|k|v]
  conv = take(f"{p}.conv1d.weight", (2 * kd + vd, 1, K))[:, 0, :].T  # [K, q|k|v]
  return {
      "q_proj": qkv[:, :kd].reshape(H, nk, dk), "k_proj": qkv[:, kd:2 * kd].reshape(H, nk, dk),
      "v_proj": qkv[:, 2 * kd:].reshape(H, nv, dv),
      "conv_q": conv[:, :kd].reshape(K, nk, dk), "conv_k": conv[:, kd:2 * kd].reshape(K, nk, dk),
      "conv_v": conv[:, 2 * kd:].reshape(K, nv, dv),
      "z_proj": take(f"{p}.in_proj_z.weight", (vd, H)).T.reshape(H, nv, dv),
      "b_proj": take(f"{p}.in_proj_b.weight", (nv, H)).T, "a_proj": take(f"{p}.in_proj_a.weight", (nv, H)).T,
      "dt_bias": take(f"{p}.dt_bias", (nv,)), "A_log": take(f"{p}.A_log", (nv,)),
      "norm": take(f"{p}.norm.weight", (dv,)),
      "out_proj": take(f"{p}.out_proj.weight", (H, vd)).T.reshape(nv, dv, H),
  }


def _indexed_attention(take: _Reader, p: str, cfg: Qwen4ExpConfig) -> dict:
  H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  ih, ihd = cfg.indexer_n_heads, cfg.indexer_head_dim
  q = take(f"{p}.q_proj.weight", (nh * 2 * hd, H)).T.reshape(H, nh, 2, hd)  # per head [query | gate]
  iqk = take(f"{p}.indexer.index_qk_proj.weight", ((ih + 1) * ihd, H)).T  # [H, ih query heads | 1 key head]
  return {
      "q_proj": q[:, :, 0], "gate_proj": q[:, :, 1],
      "k_proj": take(f"{p}.k_proj.weight", (nkv * hd, H)).T.reshape(H, nkv, hd),
      "v_proj": take(f"{p}.v_proj.weight", (nkv * hd, H)).T.reshape(H, nkv, hd),
      "o_proj": take(f"{p}.o_proj.weight", (H, nh * hd)).T.reshape(nh, hd, H),
      "q_norm": take(f"{p}.q_norm.weight", (hd,)), "k_norm": take(f"{p}.k_norm.weight", (hd,)),
      "index_q_proj": iqk[:, :ih * ihd].reshape(H, ih, ihd), "index_k_proj": iqk[:, ih * ihd:],
      "index_q_norm": take(f"{p}.indexer.q_layernorm.weight", (ihd,)),
      "index_k_norm": take(f"{p}.indexer.k_layernorm.weight", (ihd,)),
  }


def _moe(take: _Reader, p: str, cfg: Qwen4ExpConfig) -> dict:
  H, E, I, Is = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
  if take.has(f"{p}.experts.gate_up_proj"):  # the runtime's fused layout, if a state dict was saved unconverted
    gate_up = take(f"{p}.experts.gate_up_proj", (E, 2 * I, H))
    w_gate, w_up = gate_up[:, :I].transpose(0, 2, 1), gate_up[:, I:].transpose(0, 2, 1)
    w_down = take(f"{p}.experts.down_proj", (E, H, I)).transpose(0, 2, 1)
  else:
    w_gate = np.stack([take(f"{p}.experts.{e}.gate_proj.weight", (I, H)).T for e in range(E)])
    w_up = np.stack([take(f"{p}.experts.{e}.up_proj.weight", (I, H)).T for e in range(E)])
    w_down = np.stack([take(f"{p}.experts.{e}.down_proj.weight", (H, I)).T for e in range(E)])
  return {
      "router": take(f"{p}.gate.weight", (E, H)).T, "w_gate": w_gate, "w_up": w_up, "w_down": w_down,
      "shared_gate": take(f"{p}.shared_expert.gate_proj.weight", (Is, H)).T,
      "shared_up": take(f"{p}.shared_expert.up_proj.weight", (Is, H)).T,
      "shared_down": take(f"{p}.shared_expert.down_proj.weight", (H, Is)).T,
      "shared_expert_gate": take(f"{p}.shared_expert_gate.weight", (1, H))[0],
  }


def _ple(take: _Reader, p: str, cfg: Qwen4ExpConfig) -> dict:
  M, H, K, d = cfg.hc_count, cfg.hidden_size, cfg.ple_conv_kernel_size, cfg.ple_embed_dim
  return {
      "key_proj": take(f"{p}.key_proj.weight", (M * H, d)).reshape(M, H, d).transpose(0, 2, 1),
      "value_proj": take(f"{p}.value_proj.weight", (H, d)).T,
      "norm_key": take(f"{p}.norm_key.weight", (M * H,)).reshape(M, H),
      "norm_query": take(f"{p}.norm_query.weight", (M * H,)).reshape(M, H),
      "norm_conv": take(f"{p}.norm_conv.weight", (M * H,)).reshape(M, H),
      "conv_kernel": take(f"{p}.conv1d.weight", (M * H, 1, K))[:, 0, :].T.reshape(K, M, H),
  }


def _check_buffer(take: _Reader, key: str, want: np.ndarray):
  if not take.has(key):
    raise ConversionError(f"missing tensor {key!r} (the PLE hash constants the checkpoint must carry)")
  got = take(key, dtype=None)
  if got.shape != want.shape or not np.array_equal(got.astype(np.int64), want):
    raise ConversionError(f"tensor {key!r} = {got.tolist()} but the recomputed PLE recipe gives {want.tolist()}: "
                          "the checkpoint was hashed with another recipe or config (seed, vocab_size, "
                          "ngram_vocab_size_base, heads_per_ngram, ple_layer_ids); its table rows would be misread")


def _table(take: _Reader, layer: int, cfg: Qwen4ExpConfig, recipe, dtype) -> np.ndarray:
  """The layer's PLE table in memory.py's layout: the shards in numeric order, zero rows past the
  checkpoint's (its rows are padded to 128, memory's to TABLE_PAD_MULTIPLE)."""
  p = f"layers.{layer}.ple.ple_embedding"
  flat = np.array([s for order in recipe.head_sizes[layer] for s in order], np.int64)
  _check_buffer(take, f"{p}.layer_multipliers", np.asarray(recipe.multipliers[layer], np.int64))
  _check_buffer(take, f"{p}.ngram_heads_vocab_sizes", flat)
  _check_buffer(take, f"{p}.ngram_heads_offsets", np.concatenate([[0], np.cumsum(flat)[:-1]]).astype(np.int64))
  shards = sorted((int(m.group(2)), key) for key in take.state for m in [_SHARD.match(key)]
                  if m and int(m.group(1)) == layer)
  if not shards:
    raise ConversionError(f"no {p}.ngram_embedding.shard_{{j}}.weight tensors for PLE layer {layer}")
  numbers = [j for j, _ in shards]
  if numbers != list(range(len(numbers))):
    raise ConversionError(f"PLE layer {layer}: table shards {numbers} are not numbered 0..{len(numbers) - 1}")
  rows, width = recipe.rows(layer), cfg.ple_embed_dim // cfg.num_ple_heads
  total = sum(take.state[key].shape[0] for _, key in shards)
  if total != rows:
    raise ConversionError(f"PLE layer {layer}: its {len(shards)} table shards hold {total} rows; the recipe's table "
                          f"has {rows} (primes {int(flat.sum())}, padded to {recipe.table_pad_multiple})")
  padded = memory.table_layout(cfg.engram_config(), layer)[2]
  table = np.zeros((padded, width), dtype)
  start = 0
  for _, key in shards:
    shard = take(key, None, dtype=None)
    if shard.ndim != 2 or shard.shape[1] != width:
      raise ConversionError(f"tensor {key!r} has shape {list(shard.shape)}; expected [rows, {width}]")
    table[start:start + shard.shape[0]] = shard
    start += shard.shape[0]
  return table


def convert_state_dict(state: Mapping[str, np.ndarray], cfg: Qwen4ExpConfig, table_dtype=np.float32,
                       param_dtype=np.float32) -> Tuple[dict, Dict[str, np.ndarray]]:
  """(params, tables) from a save_pretrained state dict (either prefix). Params are numpy in
  `param_dtype` in `Qwen4ExpModel`'s tree; tables {memory.table_name(layer): [padded rows, head_dim]}
  in `table_dtype` (None keeps the checkpoint's dtype for either, e.g. bfloat16). Every tensor must
  be used: a leftover is an error naming it (a config that does not match the checkpoint shows up
  here first)."""
  take = _Reader(_text_state(state), param_dtype)
  params = {"embed_tokens": take("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
            "hyper_connection_mixer": _hyper_connection(take, "hyper_connection_mixer", cfg, combine=False)}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = take("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)).T
  recipe = cfg.hash_recipe() if cfg.ple_layer_ids else None
  tables = {}
  for layer, kind in enumerate(cfg.layer_types):
    p = f"layers.{layer}"
    block = {"attn_hc": _hyper_connection(take, f"{p}.attn_hyper_connection", cfg, combine=True),
             "mlp_hc": _hyper_connection(take, f"{p}.mlp_hyper_connection", cfg, combine=True),
             "mlp": _moe(take, f"{p}.mlp", cfg)}
    if kind == "linear_attention":
      block["linear_attn"] = _linear_attention(take, f"{p}.linear_attn", cfg)
    else:
      block["self_attn"] = _indexed_attention(take, f"{p}.self_attn", cfg)
    if layer in cfg.ple_layers:
      block["ple"] = _ple(take, f"{p}.ple", cfg)
      tables[memory.table_name(layer)] = _table(take, layer, cfg, recipe, table_dtype)
    params[memory.table_name(layer)] = block
  params = stack_layers(cfg, params)  # scanned segments hold their periods' layers stacked
  left = sorted(set(take.state) - take.used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
  if left:
    raise ConversionError(f"{len(left)} tensors of the checkpoint were not converted, e.g. {left[:4]}: the config "
                          "does not describe this checkpoint (layer_types, ple_layer_ids, num_experts?)")
  return params, tables


def load_hf_dir(hf_dir: str, table_dtype=np.float32, param_dtype=np.float32,
                **overrides) -> Tuple[Qwen4ExpConfig, dict, Dict[str, np.ndarray]]:
  """(config, params, tables) from a save_pretrained directory of either architecture; `overrides`
  replace config fields (e.g. dtype="bfloat16")."""
  config, state = read_hf_dir(hf_dir)
  archs = config.get("architectures") or []
  known = ("Qwen4ExpForCausalLM", "Qwen4ExpForConditionalGeneration")
  if archs and not any(a in known for a in archs):
    raise ConversionError(f"{hf_dir}/config.json: architectures {archs}; expected one of {known}")
  cfg = Qwen4ExpConfig.from_hf(config, **overrides)
  params, tables = convert_state_dict(state, cfg, table_dtype, param_dtype)
  return cfg, params, tables

