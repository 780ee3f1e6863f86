"""Generation: cached decoding equals a full forward, per row and per mesh; sampling; errors; generate.py.

The exactness tests roll out greedy decoding and compare the logits of every step with one forward
over prompt + generated tokens: they fail if an attention cache, the MLA absorbed form, the Engram
conv state or the n-gram history is off by one position or one row. Models are the tiny preset
(a dense layer, an Engram MoE layer, then a scanned run of two MoE layers, whose caches stack) with
64 positions. Shapes are shared between tests where possible: XLA's CPU compile dominates their time.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import generation
from engram_jax import runner as runner_lib
from engram_jax.config import (AttentionConfig, Config, DataConfig, EngramConfig, MeshConfig, ModelConfig, TrainConfig,
                               load_preset)
from engram_jax.engram import Engram
from engram_jax.layers import CACHE_COLLECTION, Attention
from engram_jax.model import forward, init_variables
from engram_jax.sharding import LOGICAL_RULES, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_checkpoint", "checkpoints")
TEXTS = ["The code module provides", "A list", "x = [1, 2, 3] and y = {'a': 1} are Python literals"]


TINY = load_preset(os.path.join(ROOT, "configs", "tiny.py")).model
MESH_8 = MeshConfig(data=2, fsdp=1, expert=2, tensor=2)  # batch over data x expert, experts over expert, heads over tensor


def _model(kind: str, engram: bool, dtype: str = "float32") -> ModelConfig:
  """The tiny preset (MLA, or GQA with 4 query and 2 kv heads), 64 positions, plain einsum attention
  (float64 needs it), and an Engram layer whose conv is not zero-initialised (else its state would
  not matter) and whose table rows are large enough to move the output."""
  if kind == "mla":
    attention = dataclasses.replace(TINY.attention, implementation="einsum")
  else:
    attention = AttentionConfig(kind="gqa", num_heads=4, num_kv_heads=2, head_dim=16, implementation="einsum")
  engram_cfg = dataclasses.replace(TINY.engram, conv_zero_init=False, table_init_std=0.5) if engram else None
  return dataclasses.replace(TINY, attention=attention, engram=engram_cfg, max_seq_len=64, dtype=dtype,
                             param_dtype=dtype)


def _runner(model: ModelConfig, mesh_cfg=MeshConfig(data=1), devices=1):
  cfg = Config(model=model, data=DataConfig(seq_len=32, batch_size=4), train=TrainConfig(steps=10, warmup_steps=0),
               mesh=mesh_cfg, name="test")
  mesh = make_mesh(cfg.mesh, jax.devices()[:devices])
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(lambda: nn.meta.unbox(init_variables(model, jax.random.key(0))))()
  params = variables.pop("params")
  return runner_lib.ModelRunner(cfg, params, dict(variables), mesh)


def _prompts(runner):
  return [[runner.bos_id] + runner.encode(t) for t in TEXTS]


def _rollout(gen, prompts, steps):
  """Greedy decoding driven step by step: (tokens [R, steps], logits [R, steps + 1, V]) of the real rows."""
  rows = gen.batch_bucket(len(prompts))
  padded = [list(p) for p in prompts] + [[gen.runner.pad_id]] * (rows - len(prompts))
  state = gen.prefill(padded, gen.length_bucket(max(map(len, prompts)) + steps))
  sampling = generation.sampling_arrays(rows)
  logits, tokens = [np.asarray(state.logits)], []
  for _ in range(steps):
    state, out = gen.step(state, sampling)
    tokens.append(np.asarray(out.tokens))
    logits.append(np.asarray(state.logits))
  n = len(prompts)
  return np.stack(tokens, 1)[:n], np.stack(logits, 1)[:n]


def _full_forward_logits(runner, rows, length):
  """Logits [R, length, V] of one forward over each row (the reference the caches must reproduce)."""
  padded = rows + [[runner.pad_id]] * (-len(rows) % runner.row_multiple)
  batch = runner.make_batch(padded, length)
  from engram_jax.sharding import place_batch

  with jax.set_mesh(runner.mesh), nn.logical_axis_rules(LOGICAL_RULES):
    fwd = jax.jit(lambda p, s, b: forward(runner.cfg.model, p, s, b)[0])
    logits = fwd(runner.params, runner.model_state, place_batch(batch, runner.mesh))
  return np.asarray(runner_lib.gather_global(logits))[:len(rows)]


def _check_against_full_forward(runner, prompts, tokens, logits, **tol):
  full = _full_forward_logits(runner, [list(p) + t.tolist() for p, t in zip(prompts, tokens)],
                              runner.cfg.model.max_seq_len)
  steps = tokens.shape[1]
  for b, prompt in enumerate(prompts):
    want = full[b, len(prompt) - 1:len(prompt) + steps]  # positions predicting each decoded token, and the next
    np.testing.assert_allclose(logits[b], want, err_msg=f"row {b}", **tol)
    # Greedy: every decoded token is a maximum of the full forward's logits at its position.
    chosen = np.take_along_axis(want[:-1], tokens[b][:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(chosen, np.max(want[:-1], axis=-1), err_msg=f"row {b}", **tol)


# ----------------------------------------------------------------------------------------------
# Exactness: the caches, the n-gram history and the conv state reproduce the full forward.


@pytest.mark.parametrize("kind,engram,devices", [("mla", True, 1), ("gqa", True, 1), ("mla", False, 1),
                                                 ("gqa", False, 1), ("mla", True, 8), ("gqa", True, 8)],
                         ids=["mla-engram", "gqa-engram", "mla", "gqa", "mla-engram-8dev", "gqa-engram-8dev"])
def test_greedy_step_logits_equal_full_forward_float64(kind, engram, devices):
  with jax.enable_x64(True):
    runner = _runner(_model(kind, engram, "float64"), MESH_8 if devices == 8 else MeshConfig(data=1), devices)
    gen = generation.Generator(runner, log=lambda s: None)
    prompts = _prompts(runner)
    tokens, logits = _rollout(gen, prompts, steps=12)
    assert logits.dtype == np.float64
    _check_against_full_forward(runner, prompts, tokens, logits, rtol=0, atol=1e-9)
    if devices == 8:
      _check_cache_shardings(gen, kind, prompts)


def _check_cache_shardings(gen, kind, prompts):
  """The caches carry their logical names onto the mesh: rows over the batch axes, GQA heads over
  tensor; the scanned run's caches stack along the layer axis; MLA keeps no per-head keys or values."""
  state = gen.prefill([list(p) for p in prompts] + [[2]], 32)
  batch_axes = ("data", "fsdp", "expert")
  conv = state.cache["layer_1"]["engram"]["conv_state"]  # [B, W, M, D]
  assert conv.shape == (4, (4 - 1) * 3, 2, 64) and conv.sharding.spec[0] == batch_axes
  stacked = state.cache["layers_2_3"]["attn"]
  if kind == "gqa":
    assert stacked["key"].shape == (2, 4, 32, 2, 16)
    assert tuple(stacked["key"].sharding.spec)[:4] == (None, batch_axes, None, "tensor")
  else:
    assert sorted(stacked) == ["latent", "rope_key"] and stacked["latent"].shape == (2, 4, 32, 32)
    assert tuple(stacked["latent"].sharding.spec)[:3] == (None, batch_axes, None)


@pytest.fixture(scope="module")
def generator():
  """A float32 MLA + Engram model on one device (float32 exactness: the mesh test below)."""
  return generation.Generator(_runner(_model("mla", True)), log=lambda s: None)


def test_ragged_batch_rows_equal_rows_alone_with_their_logprobs_and_gates(generator):
  runner = generator.runner
  prompts = _prompts(runner)
  together = generator.generate(prompts, 10, batch_size=4)
  alone = generator.generate(prompts, 10, batch_size=1)
  for a, b in zip(together, alone):
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.gate_means, b.gate_means, rtol=1e-5, atol=1e-6)
  # The reported log-probabilities and gate means are the full forward's at those positions.
  outs = runner.run_rows([list(p) + c.token_ids for p, c in zip(prompts, together)])
  for prompt, c, out in zip(prompts, together, outs):
    n, k = len(prompt), len(c.token_ids)
    np.testing.assert_allclose(c.logprobs, -out["nll"][n - 1:n - 1 + k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(c.gate_means), out["gates"][n:n + k].mean(-1), rtol=1e-5, atol=1e-6)
    assert np.all((np.asarray(c.gate_means) > 0) & (np.asarray(c.gate_means) < 1))


def test_float32_8_device_mesh_equals_one_device_and_the_full_forward(generator):
  eight = generation.Generator(_runner(_model("mla", True), MESH_8, devices=8), log=lambda s: None)
  prompts = _prompts(generator.runner)
  tokens_1, logits_1 = _rollout(generator, prompts, steps=8)
  tokens_8, logits_8 = _rollout(eight, prompts, steps=8)
  scale = np.max(np.abs(logits_1))
  np.testing.assert_array_equal(tokens_8, tokens_1)
  np.testing.assert_allclose(logits_8, logits_1, rtol=1e-5, atol=1e-5 * scale)
  _check_against_full_forward(eight.runner, prompts, tokens_8, logits_8, rtol=1e-5, atol=1e-5 * scale)


def _stop_inside_a_block(gen, prompts, kwargs):
  """A token row 0 first produces at position >= 2 (so that, as the end-of-sequence token, it stops
  that row inside a block of 4 while the other rows go on), and the position."""
  first = gen.generate(prompts, 12, **kwargs)[0].token_ids
  i = next(i for i in range(2, 12) if first[i] not in first[:i] and i % 4 != 3)
  return first[i], i


@pytest.mark.parametrize("devices", [1, 8], ids=["1dev", "8dev"])
def test_k_step_decode_loop_equals_one_step_per_dispatch_with_a_stop_inside_a_block(generator, devices):
  """Up to K steps per dispatch (a device-side loop) give bitwise the tokens, log-probabilities and
  gates of one step per dispatch, for greedy and seeded rows of a ragged batch, on one device and on
  the 8-device mesh, also when a row's end-of-sequence token falls inside a block (that row stops
  there, the others go on, and the loop stops once every row has ended)."""
  runner = generator.runner if devices == 1 else _runner(_model("mla", True), MESH_8, devices=8)
  prompts = _prompts(runner)
  kwargs = dict(temperature=[0.0, 0.9, 0.0], top_k=[0, 20, 0], seed=3, batch_size=4)
  eos, at = _stop_inside_a_block(generator, prompts, kwargs)
  completions = []
  for block in (1, 4):
    gen = generation.Generator(runner, log=lambda s: None, block=block)
    assert gen.path == "device" and gen.block == block
    gen.eos_id = eos  # read when the loop is traced: set before the first generate
    completions.append(gen.generate(prompts, 12, **kwargs))
  one, four = completions
  assert one[0].finish_reason == "eos" and len(one[0].token_ids) == at + 1 and one[0].token_ids[-1] == eos
  assert any(c.finish_reason == "length" and len(c.token_ids) == 12 for c in one[1:])
  for a, b in zip(one, four):
    assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    np.testing.assert_array_equal(a.gate_means, b.gate_means)


def test_decode_loop_advance_reports_the_steps_it_ran(generator):
  """advance(): up to `block` steps, fewer once every row's budget is spent; a budget of 0 (an ended
  or padding row) does not hold the loop open."""
  prompts = _prompts(generator.runner)
  rows = generator.batch_bucket(len(prompts))
  padded = [list(p) for p in prompts] + [[generator.runner.pad_id]] * (rows - len(prompts))
  state = generator.prefill(padded, generator.length_bucket(max(map(len, prompts)) + 20))
  sampling = generation.sampling_arrays(rows)
  state, out, steps = generator.advance(state, sampling, [3, 5, 2, 0])
  assert steps == 5 and out.tokens.shape == (rows, generator.block)
  tokens, _ = _rollout(generator, prompts, 5)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:len(prompts), :5], tokens)
  state, out, steps = generator.advance(state, sampling, [0, 0, 0, 0])
  assert steps == 0


# ----------------------------------------------------------------------------------------------
# Pieces: hashing history, absorbed MLA, conv state.


def test_decode_hash_ids_equal_hash_numpy_over_the_whole_sequence():
  cfg = EngramConfig(vocab_size_per_ngram=(211, 223), max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                     layer_ids=(0, 3), pad_id=2)
  hashing = data_lib.engram_hashing(data_lib.load_tokenizer(), cfg)
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, 8192, (3, 24)).astype(np.int32)
  seqs[0, 4] = seqs[0, 5] = 2  # the pad id is a real token inside a sequence
  lengths = np.array([1, 5, 9])  # prompt lengths; the rest of each row is decoded token by token
  history = hashing.history_numpy(seqs, lengths)
  lookup = hashing.lookup_array()
  step = jax.jit(hashing.next_ids)
  full = hashing.hash_numpy(seqs)  # [3, 24, layers, heads]
  for t in range(24 - 9):
    pos = lengths + t
    ids, history = step(history, seqs[np.arange(3), pos], lookup)
    np.testing.assert_array_equal(np.asarray(ids)[:, 0], full[np.arange(3), pos])


@pytest.mark.parametrize("kind", ["mla", "gqa"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_decode_attention_equals_training_form(kind, dtype, tol):
  """Prefill the first T positions (right-padded rows), decode position T: the output at T equals the
  training-form attention over all T+1 positions (for MLA, the absorbed form against the expanded one)."""
  with jax.enable_x64(dtype == "float64"):
    cfg = _model(kind, False, dtype)
    B, T = 2, 6
    x = jax.random.normal(jax.random.key(1), (B, T + 1, cfg.d_model), jnp.dtype(dtype))
    positions = jnp.broadcast_to(jnp.arange(T + 1), (B, T + 1))
    params = jax.jit(Attention(cfg).init)(jax.random.key(0), x, positions)
    train = jax.jit(Attention(cfg).apply)
    lengths = np.array([T, 3])  # row 1 is a 3-token prompt padded to T; it decodes position 3
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    x_pre = jnp.where(seg[..., None] == 1, x[:, :T], 0.0)
    prefill = jax.jit(lambda p, *a: Attention(cfg, cache_mode="prefill", cache_length=T + 1).apply(
        p, *a, mutable=[CACHE_COLLECTION])[1])
    decode = jax.jit(lambda p, *a: Attention(cfg, cache_mode="decode").apply(p, *a, mutable=[CACHE_COLLECTION])[0])
    cache = prefill(params, x_pre, positions[:, :T] * seg, seg)
    out = decode({**params, **cache}, x[np.arange(B), lengths][:, None], jnp.asarray(lengths)[:, None])
    want = jnp.stack([train(params, x, positions)[0, T], train(params, x[1:, :4], positions[1:, :4])[0, 3]])
    np.testing.assert_allclose(out[:, 0], want, rtol=tol, atol=tol)


def test_engram_conv_state_prefill_then_decode_equals_the_whole_sequence():
  with jax.enable_x64(True):
    cfg = _model("mla", True, "float64").engram
    B, T, M, D = 2, 16, 2, 8
    key = jax.random.split(jax.random.key(2), 2)
    hidden = jax.random.normal(key[0], (B, T, M, D), jnp.float64)
    rows = jax.random.normal(key[1], (B, T, cfg.num_heads, cfg.head_dim), jnp.float64)
    module = lambda mode=None: Engram(cfg, D, M, dtype=jnp.float64, param_dtype=jnp.float64, cache_mode=mode)  # noqa: E731
    params = jax.jit(module().init)(jax.random.key(0), hidden, rows)
    whole = jax.jit(module().apply)(params, hidden, rows)
    lengths = np.array([2, 11])  # prompts shorter and longer than the conv window (W = (4-1) x 3 = 9)
    P = 11
    seg = (np.arange(P)[None] < lengths[:, None]).astype(np.int32)
    prefill = jax.jit(lambda p, h, r, s: module("prefill").apply(p, h, r, segment_ids=s, mutable=[CACHE_COLLECTION])[1])
    decode = jax.jit(lambda p, h, r: module("decode").apply(p, h, r, mutable=[CACHE_COLLECTION]))
    cache = prefill(params, hidden[:, :P], rows[:, :P], seg)
    for t in range(T - P):
      pos = lengths + t
      y, cache = decode({**params, **cache}, hidden[np.arange(B), pos][:, None], rows[np.arange(B), pos][:, None])
      np.testing.assert_allclose(y[:, 0], whole[np.arange(B), pos], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Sampling.


def test_top_k_1_and_temperature_0_are_greedy_even_with_ties():
  logits = jax.random.normal(jax.random.key(0), (6, 50))
  logits = logits.at[:, 7].set(5.0).at[:, 30].set(5.0)  # a tie for the max: argmax takes token 7
  positions = jnp.arange(6)
  greedy = generation.sampling_arrays(6, temperature=0.0, seed=3)
  top1 = generation.sampling_arrays(6, temperature=1.5, top_k=1, seed=3)
  hot = generation.sampling_arrays(6, temperature=5.0, seed=3)
  t_greedy, lp = generation.sample_tokens(logits, greedy, positions)
  t_top1, _ = generation.sample_tokens(logits, top1, positions)
  t_hot, _ = generation.sample_tokens(logits, hot, positions)
  np.testing.assert_array_equal(t_greedy, 7)
  np.testing.assert_array_equal(t_top1, 7)
  assert not np.all(np.asarray(t_hot) == 7)  # an unrestricted hot sample does leave the argmax
  np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[:, 7], rtol=1e-6)


def test_top_k_and_top_p_restrict_the_support():
  # Probabilities 0.5, 0.3, 0.2 on tokens 4, 9, 1; every other token impossible.
  base = jnp.full((64,), -jnp.inf).at[jnp.array([4, 9, 1])].set(jnp.log(jnp.array([0.5, 0.3, 0.2])))
  rows = 256
  logits = jnp.broadcast_to(base, (rows, 64))
  draw = lambda **kw: set(np.asarray(generation.sample_tokens(  # noqa: E731
      logits, generation.sampling_arrays(rows, temperature=1.0, seed=np.arange(rows), **kw), jnp.zeros(rows, jnp.int32))[0]).tolist())
  assert draw() == {4, 9, 1}
  assert draw(top_k=2) == {4, 9}
  assert draw(top_p=0.5) == {4}  # token 4 alone reaches 0.5
  assert draw(top_p=0.6) == {4, 9}
  assert draw(top_k=1, top_p=0.99) == {4}


def test_fixed_seed_reproduces_and_seeds_differ(generator):
  prompts = _prompts(generator.runner)
  kw = dict(temperature=1.0, top_k=50, top_p=0.95)
  a = generator.generate(prompts, 8, seed=7, **kw)
  programs = len(generator.compiled)
  b = generator.generate(prompts, 8, seed=7, **kw)
  c = generator.generate(prompts, 8, seed=8, **kw)
  greedy = generator.generate(prompts, 8)
  top1 = generator.generate(prompts, 8, temperature=0.7, top_k=1, seed=7)
  assert [x.token_ids for x in a] == [x.token_ids for x in b]
  assert [x.token_ids for x in a] != [x.token_ids for x in c]
  assert [x.token_ids for x in top1] == [x.token_ids for x in greedy]
  # Sampling parameters are arrays: none of these calls compiled a new program.
  assert len(generator.compiled) == programs


def test_a_session_compiles_a_handful_of_programs():
  gen = generation.Generator(_runner(_model("gqa", False)), log=lambda s: None)
  runner = gen.runner
  words = "the code module provides facilities to implement read eval print loops in python".split()
  prompts = [[runner.bos_id] + runner.encode(" ".join(words[:n])) for n in range(1, 14)]  # 13 lengths
  gen.generate(prompts, 6, batch_size=4)
  # 13 prompt lengths in 4 batches (rows bucketed to 4 and 1, prompts to 16 tokens, caches to 16 or 32):
  # at most 2 x 2 prefill and as many step programs, not one per prompt.
  assert len(gen.compiled) <= 8 and len({p[1:] for p in gen.compiled if p[0] == "prefill"}) <= 4, gen.compiled
  before = list(gen.compiled)
  gen.generate(prompts, 6, batch_size=4, temperature=0.5, top_k=3, top_p=0.9, seed=1)  # other sampling values
  assert gen.compiled == before


# ----------------------------------------------------------------------------------------------
# Errors.


def test_bad_requests_are_clear_errors(generator):
  prompts = _prompts(generator.runner)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    generator.generate(prompts, 0)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generator.generate([prompts[0], []], 4)
  with pytest.raises(ValueError, match=r"prompt 0 has 60 tokens: with max_new_tokens=5 .*max_seq_len=64"):
    generator.generate([[1] * 60], 5)
  with pytest.raises(ValueError, match=r"max_new_tokens=64 leaves no room for a prompt .*max_seq_len=64"):
    generator.generate(prompts, 64)
  with pytest.raises(ValueError, match=r"token ids \[9000\]"):
    generator.generate([[1, 9000]], 5)
  with pytest.raises(ValueError, match="prompt '' is empty"):
    generator.encode_prompt("")
  with pytest.raises(ValueError, match="temperature"):
    generator.generate(prompts, 4, temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    generator.generate(prompts, 4, top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    generator.generate(prompts, 4, top_k=-2)
  with pytest.raises(ValueError, match=r"decode='fast': expected one of \('auto', 'device'"):
    generation.Generator(generator.runner, decode="fast")
  for block in (0, 2.0, True):
    with pytest.raises(ValueError, match=rf"block={block!r}: expected a positive integer"):
      generation.Generator(generator.runner, block=block)
  with pytest.raises(ValueError, match="decode='pinned_host' reads host tables, but this runner's tables are on device"):
    generation.Generator(generator.runner, decode="pinned_host")


def test_engram_config_mismatches_are_clear_errors():
  cfg = runner_lib.load_config_from_checkpoint(FIXTURE)
  no_engram = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engram=None))
  with pytest.raises(ValueError, match=r"model\.engram=None"):
    generation.check_checkpoint_engram(no_engram, FIXTURE)
  other = dataclasses.replace(cfg.model.engram, layer_ids=(2,))
  with pytest.raises(ValueError, match=r"layer_ids=\(2,\)"):
    generation.check_checkpoint_engram(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engram=other)),
                                       FIXTURE)
  generation.check_checkpoint_engram(cfg, FIXTURE)  # the right config passes
  # Params whose tables do not match the config (e.g. restored with the wrong config).
  model = _model("gqa", True)
  params = jax.eval_shape(lambda: nn.meta.unbox(init_variables(model, jax.random.key(0))))["params"]
  with pytest.raises(ValueError, match="Engram tables"):
    generation.check_tables(Config(model=dataclasses.replace(model, engram=None), data=DataConfig(seq_len=32)), params)


def test_moe_capacity_is_switched_off_for_decoding_and_said():
  model = _model("gqa", False)
  cfg = Config(model=dataclasses.replace(model, moe=dataclasses.replace(model.moe, capacity_factor=1.0)),
               data=DataConfig(seq_len=32))
  said = []
  out = generation.decoding_config(cfg, said.append)
  assert out.model.moe.capacity_factor is None and cfg.model.moe.capacity_factor == 1.0
  assert len(said) == 1 and "capacity_factor=1.0" in said[0] and "dropless" in said[0]
  assert generation.decoding_config(out, said.append) is out and len(said) == 1


def test_read_prompts_text_and_jsonl(tmp_path):
  (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
  (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "id": 3}\n')
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
  assert generation.read_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second"]
  assert generation.read_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
  with pytest.raises(ValueError, match=r"bad.jsonl:1: .*\"prompt\""):
    generation.read_prompts(str(tmp_path / "bad.jsonl"))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    generation.read_prompts(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------------------------
# generate.py on the committed fixture checkpoint (a 3-step tiny model written by train.py).


def _generate_py(*args, timeout=300):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  # The test processes' persistent compilation cache (conftest.py): a second run finds the first's programs.
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint", FIXTURE, *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_generate_py_streams_a_completion_and_writes_jsonl(tmp_path):
  out = tmp_path / "out.jsonl"
  proc = _generate_py("--prompt", "The os module", "--max_new_tokens", "6", "--output_jsonl", str(out))
  assert proc.returncode == 0, proc.stderr
  (record,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert record["prompt"] == "The os module" and len(record["token_ids"]) <= 6
  assert proc.stdout.startswith("The os module" + record["completion"])
  assert f"Completions: {out}" in proc.stdout and "restored step 3" in proc.stderr
  assert record["engram_layers"] == [1] and len(record["engram_gate_means"]) == len(record["token_ids"])
  assert all(lp <= 0 for lp in record["logprobs"]) and record["finish_reason"] in ("eos", "length")


def test_generate_py_prompts_file_sampling_is_seeded(tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "The os module"}\n{"prompt": "A list is"}\n{"prompt": "import sys"}\n')
  runs = []
  # The second run keeps the Engram tables in host memory: the same seeded samples, bit for bit.
  for name, tables in (("a", ()), ("b", ("--engram_tables", "host"))):
    out = tmp_path / f"{name}.jsonl"
    proc = _generate_py("--prompts_file", str(prompts), "--max_new_tokens", "5", "--temperature", "1.0",
                        "--top_k", "40", "--top_p", "0.9", "--seed", "4", "--batch_size", "3", "--output_jsonl",
                        str(out), *tables)
    assert proc.returncode == 0, proc.stderr
    runs.append([json.loads(line) for line in out.read_text().splitlines()])
  assert "Engram tables on host" in proc.stderr
  assert [r["prompt"] for r in runs[0]] == ["The os module", "A list is", "import sys"]
  assert runs[0] == runs[1]


@pytest.mark.parametrize("args,message", [
    (("--prompt", "The os module", "--max_new_tokens", "0"), "max_new_tokens=0"),
    (("--prompt", "word " * 200, "--max_new_tokens", "8"), "exceeds model.max_seq_len=128"),
    (("--prompt", ""), "is empty"),
    (("--prompt", "x", "--top_p", "1.5"), "top_p"),
], ids=["budget", "too-long", "empty", "top-p"])
def test_generate_py_bad_input_fails_before_restoring(args, message):
  proc = _generate_py(*args, timeout=120)
  assert proc.returncode != 0 and message in proc.stderr and "restored" not in proc.stderr, proc.stderr


def test_each_placement_gets_its_measured_default_decode_path():
  one = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  eight = make_mesh(MESH_8, jax.devices()[:8])
  assert generation.pinned_host_supported(one)  # XLA:CPU has pinned host memory
  assert generation.default_decode_path("device", one) == "device"
  assert generation.default_decode_path("host", one) == "pinned_host"
  assert generation.default_decode_path("host", eight) == "callback"  # the pinned path would copy per device
  assert generation.default_decode_path("disk", one) == "callback"
