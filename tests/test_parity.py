"""Parity with DeepSeek's official Engram demo.

The fixture folder comes from ENGRAM_PARITY_FIXTURES (default: the copy under tests/fixtures), and
every expected value and config value is read from it, so the same tests run unchanged on any
fixture set of the same layout (another seed, other sizes, other text).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.convert import official_to_params, params_to_official
from engram_jax.engram import Engram
from engram_jax.hashing import CompressedTokenizer, NgramHasher
from engram_jax.memory import read_rows

FIXTURES = os.environ.get("ENGRAM_PARITY_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "fixtures", "official_demo"))


def _load(name):
  path = os.path.join(FIXTURES, name)
  if not os.path.exists(path):
    pytest.fail(f"parity fixture {path} is missing (set ENGRAM_PARITY_FIXTURES to a fixture folder)")
  return path


@pytest.fixture(scope="module")
def meta():
  with open(_load("meta.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def small():
  return dict(np.load(_load("small.npz")))


@pytest.fixture(scope="module")
def tokenizer():
  return CompressedTokenizer(_load("tokenizer.json"))


def _config(meta, conv_zero_init=True) -> EngramConfig:
  return EngramConfig(
      vocab_size_per_ngram=tuple(meta["engram_vocab_size"]), max_ngram_size=meta["max_ngram_size"],
      n_embed_per_ngram=meta.get("n_embed_per_ngram", 64), n_head_per_ngram=meta["n_head_per_ngram"],
      layer_ids=tuple(meta["layer_ids"]), pad_id=meta["pad_id_raw"], seed=meta["seed"],
      kernel_size=meta.get("kernel_size", 4), conv_zero_init=conv_zero_init)


def test_compression_lookup(tokenizer, small, meta):
  np.testing.assert_array_equal(tokenizer.lookup, small["compress_lookup"])
  assert tokenizer.compressed_vocab_size == meta["compressed_vocab_size"]
  np.testing.assert_array_equal(tokenizer.compress(small["input_ids"]), small["compressed_ids"])
  assert int(tokenizer.lookup[meta["pad_id_raw"]]) == meta["pad_id_compressed"]


def test_negative_ids_pass_through(tokenizer):
  ids = np.array([[-1, 0, 1, -7]])
  out = tokenizer.compress(ids)
  assert out[0, 0] == -1 and out[0, 3] == -7
  np.testing.assert_array_equal(out[0, 1:3], tokenizer.lookup[[0, 1]])


def test_head_sizes_and_multipliers(tokenizer, meta):
  hasher = NgramHasher.from_tokenizer(_config(meta), tokenizer)
  for layer in meta["layer_ids"]:
    assert hasher.head_sizes[layer] == meta["head_vocab_sizes"][str(layer)]
    np.testing.assert_array_equal(hasher.multipliers[layer], np.array(meta["multipliers"][str(layer)], np.int64))


def test_hash_ids_small(tokenizer, small, meta):
  hasher = NgramHasher.from_tokenizer(_config(meta), tokenizer)
  compressed = tokenizer.compress(small["input_ids"])
  out_np = hasher.hash_numpy(compressed)
  out_jnp = np.asarray(jax.jit(hasher.hash_jnp)(jnp.asarray(compressed, jnp.int32)))
  for i, layer in enumerate(meta["layer_ids"]):
    expected = small[f"hash_layer{layer}"]
    np.testing.assert_array_equal(hasher.hash_layer_numpy(compressed, layer), expected)
    np.testing.assert_array_equal(out_np[..., i, :], expected)
    np.testing.assert_array_equal(out_jnp[..., i, :], expected)


def test_hash_ids_full_scale(meta):
  full = meta.get("full_scale")
  data = np.load(_load("full_scale_hash.npz"))
  cfg = EngramConfig(vocab_size_per_ngram=tuple(full["engram_vocab_size"]), max_ngram_size=full["max_ngram_size"],
                     n_embed_per_ngram=full.get("n_embed_per_ngram", 512), n_head_per_ngram=full["n_head_per_ngram"],
                     layer_ids=tuple(full["layer_ids"]), pad_id=full["pad_id_raw"], seed=full["seed"])
  lookup = data["compress_lookup"]
  assert int(lookup.max()) + 1 == full["compressed_vocab_size"]
  hasher = NgramHasher(cfg, full["compressed_vocab_size"], int(lookup[full["pad_id_raw"]]))
  for layer in cfg.layer_ids:
    assert hasher.head_sizes[layer] == full["head_vocab_sizes"][str(layer)]
    np.testing.assert_array_equal(hasher.multipliers[layer], np.array(full["multipliers"][str(layer)], np.int64))
  compressed = lookup[data["input_ids"]]
  out_np = hasher.hash_numpy(compressed)
  out_jnp = np.asarray(jax.jit(hasher.hash_jnp)(jnp.asarray(compressed, jnp.int32)))
  for i, layer in enumerate(cfg.layer_ids):
    np.testing.assert_array_equal(out_np[..., i, :], data[f"hash_layer{layer}"])
    np.testing.assert_array_equal(out_jnp[..., i, :], data[f"hash_layer{layer}"])


def _official_state_dict(small):
  return {k[len("param/"):]: v for k, v in small.items() if k.startswith("param/")}


def test_module_output_float64(small, meta):
  cfg = _config(meta, conv_zero_init=False)
  layer, M, D = meta["engram_module_layer_id"], meta["hc_mult"], meta["hidden_size"]
  with jax.enable_x64(True):
    params, table = official_to_params(_official_state_dict(small), cfg, layer, M, np.float64)
    module = Engram(cfg, D, M, dtype=jnp.float64, param_dtype=jnp.float64)
    rows = read_rows(jnp.asarray(table), cfg, layer, jnp.asarray(small[f"hash_layer{layer}"]))
    out = module.apply({"params": params}, jnp.asarray(small["hidden_states"]), rows)
    out = np.asarray(out)
  assert out.dtype == np.float64
  np.testing.assert_allclose(out, small["output"], rtol=0, atol=1e-10)


def test_module_output_float32(small, meta):
  cfg = _config(meta, conv_zero_init=False)
  layer, M, D = meta["engram_module_layer_id"], meta["hc_mult"], meta["hidden_size"]
  params, table = official_to_params(_official_state_dict(small), cfg, layer, M, np.float32)
  module = Engram(cfg, D, M)
  rows = read_rows(jnp.asarray(table), cfg, layer, jnp.asarray(small[f"hash_layer{layer}"], jnp.int32))
  out = np.asarray(module.apply({"params": params}, jnp.asarray(small["hidden_states"], jnp.float32), rows))
  ref = small["output_fp32"]
  assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_converter_round_trip(small, meta):
  cfg = _config(meta, conv_zero_init=False)
  layer, M = meta["engram_module_layer_id"], meta["hc_mult"]
  sd = _official_state_dict(small)
  back = params_to_official(*official_to_params(sd, cfg, layer, M, np.float64), cfg, layer)
  assert set(back) == set(sd)
  for name, value in sd.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_converter_rejects_other_config(small, meta):
  cfg = _config(meta, conv_zero_init=False)
  other = dataclasses.replace(cfg, vocab_size_per_ngram=tuple(v + 500 for v in cfg.vocab_size_per_ngram))
  with pytest.raises(ValueError, match="embedding.weight has shape"):
    official_to_params(_official_state_dict(small), other, meta["engram_module_layer_id"], meta["hc_mult"])
