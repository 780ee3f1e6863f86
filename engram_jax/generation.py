"""Generation: prefill a batch of prompts, then decode one token per row per step with caches.

With the Engram tables on the devices a decode step is three parts, in this order, in one jitted
function:

  sample  the next token of every row from the logits the previous step (or prefill) left, per row
          (greedy, temperature, top-k, top-p; parameters are arrays, so changing them recompiles
          nothing; the key is the row's seed folded with its sequence index and position);
  hash    the token's Engram hash ids, in-graph, from the row's n-gram history (its last max_n-1
          compressed ids), and gather their rows from the tables (`memory.gather`: the one place
          a decode step reads table rows);
  blocks  the model (`model.forward` with cache_mode="decode", the training modules' own params) on
          that one token at the row's position, updating the caches: attention keys/values (GQA) or
          the latent and rotary key (MLA, decoded in the absorbed form), each Engram layer's conv
          state. mHC and MoE are per token and keep nothing.

Prefill reads its rows through the runner's row source (`tables/source.py`), as evaluation does.
Where a decode step's rows come from is the step's own row source (`_RowSource`, chosen once per
generator from the runner's placement; `decode=` names one):

  device       the tables are params on the devices: the runner's source (`memory.gather`);
  pinned_host  host tables as `pinned_host` arrays: the step moves its row ids to host memory,
               gathers there (`compute_on("device_host")`) and brings the rows back, all in the
               step's own program, so the transfer overlaps the blocks before the first Engram layer;
  callback     any host or disk tables (memory maps, quantized rows, patches, a hot-row cache): the
               program calls back into the runner's source's host gather (`io_callback` into
               `HostRows.gather`) and reads the rows in-graph as prefill does;
  split        the alternative for host tables (`_HostStep`): the runner's source gathers between two
               programs, the blocks before the first Engram layer dispatched first.

With the first three a decode step is one program, and `advance(state, sampling, budget)` runs up to
`block` of them in one program (a `lax.while_loop` that stops when every row has ended: an
end-of-sequence token or its budget), so batch-1 decoding is not bounded by Python dispatch. Every
path computes the same values in the same order: in float32 their tokens, log-probabilities and
gates are bitwise those of the one-step device decode (tested); with bfloat16 compute the split
path stores the residual streams in bfloat16 at the first Engram layer, where the others may keep
more precision.

Prefill runs the prompts exactly as training would (`model.forward` with cache_mode="prefill"):
right-padded, with per-row lengths, because the hasher's pad id is a real token (left padding would
change hash ids and conv inputs); its hash ids come from the host hasher, like every training batch.
Caches are declared with logical axis names (sharding.LOGICAL_RULES shards them like everything
else: rows over the batch axes, GQA heads over "tensor") and donated to each step.

Shapes are bucketed so a session compiles a handful of programs: prompt lengths to powers of two
(at least MIN_PROMPT_BUCKET), cache lengths to powers of two (at most model.max_seq_len), rows to
powers of two (and a multiple of the mesh's batch shards). MoE must not drop a token while decoding
(a decoded token's output would depend on what else is in the batch): a configured capacity factor is
switched off for decoding (dropless dispatch), and the generator says so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import data as data_lib
from engram_jax import memory
from engram_jax.config import Config
from engram_jax.layers import CACHE_COLLECTION
from engram_jax.model import engram_gates, forward
from engram_jax.runner import ModelRunner, check_checkpoint_engram, gather_global
from engram_jax.sharding import LOGICAL_RULES, batch_sharding as place_sharding, place_batch, tree_shardings
from engram_jax.tables import triggers as trigger_lib
from engram_jax.tables.quant import dequantize

MIN_PROMPT_BUCKET = 16


# ----------------------------------------------------------------------------------------------
# Sampling.


class Sampling(NamedTuple):
  """Per-row sampling parameters, arrays [B] (values, not compile-time constants)."""

  temperature: Any  # float32; 0 = greedy (argmax)
  top_k: Any  # int32; keep the k most likely tokens, 0 = no limit
  top_p: Any  # float32 in (0, 1]; keep the smallest set of most likely tokens whose probability reaches p
  seed: Any  # int32: the row's seed
  sequence: Any  # int32: the row's index in its request (rows sharing a seed still draw differently)


def sampling_arrays(rows: int, temperature=0.0, top_k=0, top_p=1.0, seed=0, sequence=None) -> Sampling:
  """Host arrays [rows] from scalars or per-row sequences, checked: temperature >= 0, top_k >= 0,
  0 < top_p <= 1."""
  column = lambda value, dtype: np.broadcast_to(np.asarray(value, dtype), (rows,)).copy()  # noqa: E731
  temperature, top_k, top_p = column(temperature, np.float32), column(top_k, np.int32), column(top_p, np.float32)
  if not np.all(np.isfinite(temperature)) or np.any(temperature < 0):
    raise ValueError(f"temperature={temperature.tolist()}: expected finite values >= 0 (0 = greedy)")
  if np.any(top_k < 0):
    raise ValueError(f"top_k={top_k.tolist()}: expected integers >= 0 (0 = no limit)")
  if not np.all((top_p > 0) & (top_p <= 1)):
    raise ValueError(f"top_p={top_p.tolist()}: expected values in (0, 1] (1 = no limit)")
  sequence = np.arange(rows) if sequence is None else sequence
  return Sampling(temperature, top_k, top_p, column(seed, np.int32), column(sequence, np.int32))


def sample_tokens(logits: jax.Array, sampling: Sampling, positions: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(tokens [B] int32, their log-probabilities under the model [B] float32) from logits [B, V].

  Rows with temperature 0 take the argmax. The others sample from softmax(logits / temperature)
  restricted to the top_k most likely tokens, then to the smallest prefix of those (by probability)
  whose mass reaches top_p; the ordering is a stable sort of the raw logits, so top_k = 1 is the
  argmax exactly. The key of row b is key(seed_b) folded with sequence_b and positions_b (the
  position the token will take), so a row draws the same tokens whatever batch it is in.
  The log-probability reported is the model's (log_softmax of the raw logits), not the tempered one.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  vocab = logits.shape[-1]
  temperature = jnp.asarray(sampling.temperature, logits.dtype)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample():
    order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, V] most likely first, ties by token id
    scaled = jnp.take_along_axis(logits, order, axis=-1) / jnp.where(temperature > 0, temperature, 1)[:, None]
    top_k = jnp.asarray(sampling.top_k, jnp.int32)
    in_k = jnp.arange(vocab)[None, :] < jnp.where(top_k > 0, top_k, vocab)[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, scaled, -jnp.inf), axis=-1)
    in_p = (jnp.cumsum(probs, axis=-1) - probs) < jnp.asarray(sampling.top_p, logits.dtype)[:, None]
    masked = jnp.where(in_k & in_p, scaled, -jnp.inf)

    def draw(seed, sequence, position, row):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), sequence), position)
      return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(jnp.asarray(sampling.seed, jnp.int32), jnp.asarray(sampling.sequence, jnp.int32),
                            positions, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)

  # An all-greedy batch skips the vocabulary sort.
  tokens = jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Decoding state.


class DecodeState(NamedTuple):
  """What a batch of sequences carries between decode steps (every leaf has the batch first)."""

  cache: Any  # the model's "cache" collection: per attention layer keys/values or MLA latents, per Engram layer its conv state
  history: Any  # [B, max_n-1] int32: compressed ids of each row's last max_n-1 tokens ([B, 0] without Engram)
  positions: Any  # [B] int32: the position of each row's next token (= its tokens so far)
  logits: Any  # [B, V] float32: the next token's logits
  # Host tables only: the next step's sample, drawn at the end of the previous step (tokens,
  # logprobs, hash ids, history), so its rows can be gathered as soon as that step ends; None else.
  pending: Any = None
  # Knowledge-patch triggers only: [B, width] int32, each row's last `width` tokens (the current one
  # last; triggers.PAD before its start), matched in-graph against the triggers each step; None else.
  window: Any = None


class StepOutput(NamedTuple):
  tokens: Any  # [B] int32: the token each row sampled
  logprobs: Any  # [B] float32: its log-probability under the model
  gates: Any  # [B, num_engram_layers] float32: each Engram layer's gate at that token, mean over branches


_LOOP_OUTPUT_NAMES = (("batch", None), ("batch", None), ("batch", None, None))  # StepOutput [B, block, ...]


def _box(x, *names):
  return nn.LogicallyPartitioned(x, names)


# ----------------------------------------------------------------------------------------------
# Row sources: where a decode step reads its Engram rows (module docstring).

DECODE_PATHS = ("auto", "device", "pinned_host", "callback", "split")
DEFAULT_BLOCK = 16  # decode steps per dispatch (`Generator.decode`); BENCHMARKS.md "Batch-1 decoding"


class _RowSource:
  """One way of reading a decode step's rows in-graph. `operand()` is what the step program takes
  for it (an argument, so the tables are not baked into the program as constants); `rows(params,
  operand, engram_ids [B, 1, L, H])` -> {table name: rows [B, 1, H, d] in the model's dtype}."""

  name = ""

  def __init__(self, generator: "Generator"):
    self.engram = generator.engram
    self.dtype = jnp.dtype(generator.cfg.model.dtype)
    self.runner = generator.runner

  def operand(self):
    return None

  def abstract_operand(self):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.operand())

  def rows(self, params, operand, engram_ids):
    raise NotImplementedError


class _DeviceRows(_RowSource):
  """The runner's row source read in the step (device tables: `memory.gather`)."""

  name = "device"

  def rows(self, params, operand, engram_ids):
    return self.runner.source.rows(params, None, operand, engram_ids)


def _host_compute(fn):
  """`fn` run on the host (its outputs in host memory), with whichever form of jax's compute_on this
  jax has: the function form (`compute_on2`, renamed `compute_on` in later releases)."""
  from jax.experimental import compute_on as co

  host = jax.memory.Space.Host
  if hasattr(co, "compute_on2"):
    return co.compute_on2(fn, compute_type="device_host", out_memory_spaces=host)
  return co.compute_on(fn, compute_type="device_host", out_memory_spaces=host)


def pinned_host_supported(mesh) -> bool:
  """Whether every device of `mesh` has a `pinned_host` memory (the in-graph host gather's tables)."""
  try:
    return all("pinned_host" in [m.kind for m in d.addressable_memories()] for d in mesh.devices.flat)
  except Exception:  # a backend without memory kinds
    return False


class _PinnedHostRows(_RowSource):
  """Host tables copied once into `pinned_host` arrays (with their patches' rows; rebuilt when the
  patches change), replicated over the mesh: one copy of the tables per device of the mesh, so it is
  the default for one device only. The gather runs on the host, so only the step's rows cross to the
  device. The hot-row cache is not used (every row is read from host memory)."""

  name = "pinned_host"

  def __init__(self, generator: "Generator"):
    super().__init__(generator)
    tables = self.runner.tables
    if tables.placement != "host" or tables.row_range is not None:
      raise ValueError(f"decode='pinned_host' copies RAM tables into pinned host memory: these tables are on "
                       f"{tables.placement}{' (a row range per process)' if tables.row_range is not None else ''}; "
                       "use decode='callback'")
    if not pinned_host_supported(generator.mesh):
      raise ValueError(f"decode='pinned_host': the devices of this mesh ({jax.devices()[0].platform}) have no "
                       "pinned_host memory; use decode='callback'")
    self.sharding = jax.sharding.NamedSharding(generator.mesh, jax.sharding.PartitionSpec(), memory_kind="pinned_host")
    self._key, self._placed = None, None

  def operand(self):
    tables = self.runner.tables
    key = tuple((name, id(entry[1])) for name, entry in sorted(tables.overlay.items()))
    if self._placed is None or key != self._key:
      placed = {}
      for name in tables.names:
        rows, scale = tables.rows[name], tables.scales[name]
        if name in tables.overlay:  # the patched rows written into a copy (the base rows are never written)
          ids, o_rows, o_scale = tables.overlay[name]
          rows = np.array(rows, copy=True)
          rows[ids] = o_rows
          if scale is not None:
            scale = np.array(scale, copy=True)
            scale[ids] = o_scale
        placed[name] = (jax.device_put(rows, self.sharding),
                        None if scale is None else jax.device_put(scale, self.sharding))
      self._key, self._placed = key, placed
    return self._placed

  def rows(self, params, operand, engram_ids):
    ids = memory.row_ids(self.engram, engram_ids)
    out = {}
    for name, (table, scale) in operand.items():
      host_ids = jax.device_put(ids[name], jax.memory.Space.Host)  # [B, 1, H]: a gather's operands share a space
      take = lambda t, i: t.at[i].get(mode="promise_in_bounds")  # noqa: E731  (hash ids are in range by construction)
      got = jax.device_put(_host_compute(take)(table, host_ids), jax.memory.Space.Device)
      got_scale = None if scale is None else jax.device_put(_host_compute(take)(scale, host_ids),
                                                            jax.memory.Space.Device)
      out[name] = dequantize(got, got_scale, self.dtype)
    return out


class _CallbackRows(_RowSource):
  """Any host or disk tables: the step program calls the runner's row source's host gather
  (`HostRows.gather`: the distinct rows per batch shard minus the hot-row cache, counted by its hit
  counter) and reads the rows in-graph from them and the cache (`HostRows.rows`)."""

  name = "callback"

  def operand(self):
    return self.runner.source.operand()

  def abstract_operand(self):
    return None if self.operand() is None else super().abstract_operand()

  def rows(self, params, operand, engram_ids):
    from jax.experimental import io_callback

    source = self.runner.source
    B, T, _, H = engram_ids.shape
    pad_to = B // self.runner.row_multiple * T * H  # every lookup of a shard: one fixed shape whatever the ids
    host = io_callback(lambda ids: source.gather(np.asarray(ids), pad_to=pad_to),
                       source.gather_shapes(B, T, pad_to), engram_ids)
    return source.rows(params, host, operand, engram_ids)


def _row_source(generator: "Generator", path: str) -> _RowSource:
  return {"device": _DeviceRows, "pinned_host": _PinnedHostRows, "callback": _CallbackRows}[path](generator)


def default_decode_path(placement: str, mesh) -> str:
  """The fastest path measured for a placement (BENCHMARKS.md "Batch-1 decoding", bench_offload.py
  --parts decode): device tables read in-graph; RAM tables from pinned host memory where the platform
  has it and the mesh is one device (else through the callback); memory-mapped tables through the
  callback."""
  if placement == "device":
    return "device"
  if placement == "host" and mesh.devices.size == 1 and pinned_host_supported(mesh):
    return "pinned_host"
  return "callback"


def decoding_config(cfg: Config, log: Callable[[str], None] = print) -> Config:
  """The config decoding runs: MoE without a capacity factor. With one, a group's tokens beyond
  ceil(capacity_factor * tokens * top_k / experts) per expert are dropped, so a token's output
  would depend on the rest of its batch (and decode steps would not equal a forward over the
  sequence); the dropless dispatch computes every assignment."""
  moe = cfg.model.moe
  if moe is None or moe.capacity_factor is None:
    return cfg
  log(f"decoding: MoE capacity_factor={moe.capacity_factor} could drop tokens; decoding uses dropless dispatch "
      "(capacity_factor=None) instead")
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=dataclasses.replace(moe, capacity_factor=None)))


class _Lazy:
  """A jitted function made on first use (its output shardings need a trace of its own)."""

  def __init__(self, make: Callable[[], Callable]):
    self._make, self._fn = make, None

  def get(self) -> Callable:
    if self._fn is None:
      self._fn = self._make()
    return self._fn

  def __call__(self, *args):
    return self.get()(*args)

  def __getattr__(self, name):  # .lower, .trace, .eval_shape of the jitted function
    return getattr(self.get(), name)


class _Programs(NamedTuple):
  prefill: Callable  # jitted prefill of one bucket
  step: Callable  # decode step, jitted (one program) or a `_HostStep` (shared by buckets whose states have the same shapes)
  loop: Callable  # up to `block` decode steps in one program (`_loop_fn`), jitted
  state: DecodeState  # abstract state (ShapeDtypeStructs with shardings)
  sampling: Sampling  # abstract sampling arrays


def _power_of_two_at_least(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int, vocab_size: int):
  """Raises ValueError for no prompts, an empty prompt, a budget < 1, a token id outside the
  vocabulary, or a prompt too long for max_seq_len with the budget (each naming the value)."""
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
  if len(prompts) == 0:
    raise ValueError("no prompts: expected at least one prompt")
  if max_new_tokens >= max_seq_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within model.max_seq_len="
                     f"{max_seq_len}: expected at most {max_seq_len - 1}")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty: expected at least one token")
    if len(prompt) + max_new_tokens > max_seq_len:
      raise ValueError(f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} that exceeds "
                       f"model.max_seq_len={max_seq_len}; expected at most {max_seq_len - max_new_tokens} prompt tokens")
    arr = np.asarray(prompt)
    if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= vocab_size:
      bad = [t for t in arr.tolist() if not (isinstance(t, int) and 0 <= t < vocab_size)][:5]
      raise ValueError(f"prompt {i} has token ids {bad}: expected integers in [0, {vocab_size}) (model.vocab_size)")


def encode_prompt(tokenizer, data_cfg, text: str) -> List[int]:
  """A prompt's token ids as training saw a document's start: <bos> (when the data config adds
  it) + the text's tokens. Empty text is a ValueError."""
  ids = list(tokenizer.encode(text, add_special_tokens=False).ids) if text else []
  if not ids:
    raise ValueError(f"prompt {text!r} is empty: expected some text")
  bos = [data_lib.special_id(tokenizer, data_cfg.bos_token, "bos_token")] if data_cfg.add_bos else []
  return bos + ids


@dataclasses.dataclass
class Completion:
  """One prompt's generation."""

  prompt_ids: List[int]
  token_ids: List[int]  # generated tokens (the end-of-sequence token included when it ended the row)
  logprobs: List[float]  # per generated token, under the model
  gate_means: List[List[float]]  # per generated token, per Engram layer: its gate, mean over mHC branches
  finish_reason: str  # "eos" or "length"


@dataclasses.dataclass
class Timing:
  """Where a Generator's wall time went, summed over its generate calls: prefill and decode seconds
  without compilation (traced, lowered and compiled or read from the compilation cache on first
  use of each shape), the compilation seconds, and the tokens each produced."""
  prefill_seconds: float = 0.0
  decode_seconds: float = 0.0
  compile_seconds: float = 0.0
  prompt_tokens: int = 0
  new_tokens: int = 0

  def describe(self) -> str:
    rate = self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")
    return (f"decode {self.new_tokens} tokens in {self.decode_seconds:.2f} s ({rate:.1f} tokens/s); prefill "
            f"{self.prompt_tokens} prompt tokens in {self.prefill_seconds:.2f} s; compilation {self.compile_seconds:.1f} s")


class _Clock:
  """Wall time of a phase minus the compilation inside it."""

  def __init__(self):
    from engram_jax.compilation import CompileStats

    self.stats = CompileStats.get()
    self.start, self.compile_start = time.perf_counter(), self.stats.seconds

  def stop(self) -> Tuple[float, float]:
    """(seconds without compilation, compilation seconds) since the clock started."""
    compiled = self.stats.seconds - self.compile_start
    return max(0.0, time.perf_counter() - self.start - compiled), compiled


class Generator:
  """Prefill and cached decoding for a `ModelRunner`'s model, params and mesh.

  `generate(prompts, max_new_tokens, ...)` is the whole loop; `prefill`, `step` (one decode step)
  and `advance` (up to `block` steps in one program) are its parts, which tests and benchmarks drive
  directly. `decode` picks the row source of a step (`DECODE_PATHS`, module docstring; "auto":
  `default_decode_path`); on the split path a step is a `_HostStep`. `compiled` lists the shape
  buckets compiled so far, ("prefill", rows, prompt length, cache length) and ("step", rows, cache
  length): a bucket's step and its K-step loop count as one ("step", ...) entry.
  """

  def __init__(self, runner: ModelRunner, log: Callable[[str], None] = print, decode: str = "auto",
               block: int = DEFAULT_BLOCK):
    if jax.process_count() > 1:
      raise NotImplementedError(f"generation runs in one process (this is process {jax.process_index()} of "
                                f"{jax.process_count()}): prompts are placed as one process's rows")
    if decode not in DECODE_PATHS:
      raise ValueError(f"decode={decode!r}: expected one of {DECODE_PATHS}")
    if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 1:
      raise ValueError(f"block={block!r}: expected a positive integer (decode steps per dispatch)")
    self.runner = runner
    self.cfg = decoding_config(runner.cfg, log)
    self.mesh = runner.mesh
    self.engram = self.cfg.model.engram
    self.placement = runner.placement
    check_tables(self.cfg, runner.params, None if runner.tables is None else runner.tables.rows)
    path = default_decode_path(self.placement, self.mesh) if decode == "auto" else decode
    if (path == "device") != (self.placement == "device"):
      raise ValueError(f"decode={decode!r} reads {'device' if path == 'device' else 'host'} tables, but this runner's "
                       f"tables are on {self.placement}: expected "
                       f"{'device' if runner.tables is None else 'pinned_host, callback or split'} (or auto)")
    self.path = path
    self.block = 1 if path == "split" else int(block)  # the split step is a Python-level pipeline
    # The split path splits the step at the first Engram layer (module docstring) when blocks come before it.
    first = min(self.engram.layer_ids) if self.engram is not None else 0
    self.split_layer = first if (path == "split" and first > 0) else None
    # The row source of one-program steps (for the split path: only for the shapes of its outputs).
    self.source = _row_source(self, "callback" if path == "split" else path)
    self.hashing = runner.hashing
    self.eos_id = data_lib.special_id(runner.tokenizer, self.cfg.data.eos_token, "eos_token")
    self.lookup = None
    if self.engram is not None:
      with jax.set_mesh(self.mesh):
        self.lookup = jax.device_put(self.hashing.lookup_array(),
                                     jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    self.compiled: List[Tuple] = []
    self._programs: Dict[Tuple, _Programs] = {}  # (rows, prompt length, cache length) -> its programs
    self._steps: Dict[Tuple, Tuple[Callable, Callable]] = {}  # the state's leaf shapes -> (step, K-step loop)
    self._placed_cache: Dict[str, Tuple] = {}  # step(): host values -> their placed arrays (`_placed`)
    self.timing = Timing()

  def describe(self) -> str:
    """The decode path in words (generate.py prints it with --verbosity)."""
    where = {"device": "rows gathered in-graph from the device tables",
             "pinned_host": "rows gathered in-graph from pinned host memory",
             "callback": f"rows read by an in-graph host callback from the {self.placement} tables",
             "split": "host gather between two programs, the blocks before the first Engram layer first"}[self.path]
    per = "1 token per dispatch" if self.block == 1 else f"up to {self.block} tokens per dispatch"
    return f"decode path {self.path} ({where}; {per})"

  @classmethod
  def from_checkpoint(cls, cfg: Config, checkpoint_dir: str, *, step: Optional[int] = None, mesh=None,
                      log: Callable[[str], None] = print, decode: str = "auto", block: int = DEFAULT_BLOCK,
                      **tables) -> "Generator":
    """A checkpoint's parameters restored onto `mesh` (default: every device here), after checking
    that `cfg`'s Engram config is the one the checkpoint's tables were written with. `tables` are
    ModelRunner.from_checkpoint's placement options (engram_tables, table_dir, cache_rows, quantize,
    verify_tables); `decode` and `block` as for the constructor."""
    check_checkpoint_engram(cfg, checkpoint_dir, step)
    runner = ModelRunner.from_checkpoint(cfg, checkpoint_dir, step=step, mesh=mesh, log=log, **tables)
    return cls(runner, log=log, decode=decode, block=block)

  # -- the jitted parts -------------------------------------------------------------------------

  def _prefill_fn(self, params, model_state, batch, history, engram_scale, feed=None, operand=None, triggers=None, *,
                  cache_length: int):
    batch = dict(batch)
    window, trigger_ids = batch.pop("trigger_window", None), batch.pop("trigger_ids", None)
    rows = None if self.engram is None else self.runner.source.rows(params, feed, operand, batch.get("engram_ids"))
    rows = self.runner.source.with_triggers(rows, trigger_ids, triggers)
    (logits, _), mutated = forward(self.cfg.model, params, model_state, batch, engram_scale=engram_scale, rows=rows,
                                   mutable=[CACHE_COLLECTION], cache_mode="prefill", cache_length=cache_length)
    lengths = jnp.sum(batch["segment_ids"] != 0, axis=1).astype(jnp.int32)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    return DecodeState(cache=mutated[CACHE_COLLECTION], history=_box(history, "batch", None),
                       positions=_box(lengths, "batch"), logits=_box(last, "batch", "act_vocab"),
                       window=None if window is None else _box(window, "batch", None))

  def _sample_fn(self, state: DecodeState, sampling: Sampling, lookup):
    """sample + hash: (tokens [B], logprobs [B], the tokens' hash ids [B, 1, L, H] or None, new history)."""
    tokens, logprobs = sample_tokens(state.logits, sampling, state.positions)
    engram_ids, history = None, state.history
    if self.engram is not None:
      engram_ids, history = self.hashing.next_ids(state.history, tokens, lookup)
    return tokens, logprobs, engram_ids, history

  def _blocks_fn(self, params, model_state, state: DecodeState, tokens, logprobs, history, rows, engram_scale,
                 streams=None, window=None):
    """The blocks on the sampled tokens (all of them, or with `streams` the tail from the split layer
    on): the new state and the step's outputs."""
    cfg = self.cfg.model
    batch = {"tokens": tokens[:, None], "positions": state.positions[:, None]}
    split = {} if streams is None else dict(part="tail", split_layer=self.split_layer, streams=streams)
    (logits, _), mutated = forward(cfg, params, {**model_state, CACHE_COLLECTION: state.cache}, batch, rows=rows,
                                   engram_scale=engram_scale, mutable=[CACHE_COLLECTION, "intermediates"],
                                   cache_mode="decode", **split)
    B = tokens.shape[0]
    if self.engram is not None:
      gates = jnp.mean(engram_gates(cfg, mutated["intermediates"], (B, 1))[:, 0], axis=-1)  # [B, L]
    else:
      gates = jnp.zeros((B, 0), jnp.float32)
    new_state = DecodeState(cache=mutated[CACHE_COLLECTION], history=_box(history, "batch", None),
                            positions=_box(state.positions + 1, "batch"), logits=_box(logits[:, 0], "batch", "act_vocab"),
                            window=None if window is None else _box(window, "batch", None))
    return new_state, StepOutput(_box(tokens, "batch"), _box(logprobs, "batch"), _box(gates, "batch", None))

  def _step_fn(self, params, model_state, state: DecodeState, sampling: Sampling, lookup, engram_scale, tables):
    """One-program step: sample, hash, the rows from the row source (`tables` is its operand), blocks."""
    tokens, logprobs, engram_ids, history = self._sample_fn(state, sampling, lookup)
    rows = None if self.engram is None else self.source.rows(params, tables["rows"], engram_ids)
    rows, window = self._triggered(rows, state, tokens, tables["triggers"])
    return self._blocks_fn(params, model_state, state, tokens, logprobs, history, rows, engram_scale, window=window)

  def _triggered(self, rows, state: DecodeState, tokens, triggers):
    """(rows with the step's triggered rows replaced, the new window): the window takes the sampled
    token and is matched exactly against the trigger table, as prefill's host matching would."""
    if state.window is None:
      return rows, None
    window = trigger_lib.push(state.window, tokens)
    if triggers is None:
      return rows, window
    trigger_ids = trigger_lib.match_last(window, triggers["tokens"])[:, None]  # [B, 1]
    return self.runner.source.with_triggers(rows, trigger_ids, triggers), window

  def _step_operand(self):
    """What a step program takes besides the state: the row source's operand and the triggers'."""
    return {"rows": self.source.operand(), "triggers": self.runner.source.trigger_operand()}

  def _abstract_step_operand(self):
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
    triggers = self.runner.source.trigger_operand()
    return {"rows": self.source.abstract_operand(),
            "triggers": None if triggers is None else jax.tree.map(abstract, triggers)}

  def _loop_fn(self, params, model_state, state: DecodeState, sampling: Sampling, lookup, engram_scale, tables,
               budget):
    """Up to `self.block` steps in one program: (state, StepOutput [B, block, ...], steps run).

    `budget` [B] int32: tokens each row may still produce (0: the row has ended, or is padding). A
    row ends at its end-of-sequence token or when its budget is spent; the loop stops once every row
    has ended. Rows that ended keep stepping with the others (their later outputs are not theirs),
    exactly as the one-step loop steps them, so each step computes what the one-step program does."""
    unboxed = lambda tree: nn.meta.unbox(tree)  # noqa: E731
    B, K = budget.shape[0], self.block
    layers = 0 if self.engram is None else len(self.engram.layer_ids)
    outputs = StepOutput(jnp.zeros((K, B), jnp.int32), jnp.zeros((K, B), jnp.float32),
                         jnp.zeros((K, B, layers), jnp.float32))

    def body(carry):
      i, state, done, outputs = carry
      new_state, out = unboxed(self._step_fn(params, model_state, state, sampling, lookup, engram_scale, tables))
      outputs = StepOutput(*(buf.at[i].set(x) for buf, x in zip(outputs, out)))
      done = done | (out.tokens == self.eos_id) | (i + 1 >= budget)
      return i + 1, new_state._replace(pending=None), done, outputs

    def more(carry):
      i, _, done, _ = carry
      return (i < K) & ~jnp.all(done)

    steps, state, _, outputs = jax.lax.while_loop(more, body, (jnp.int32(0), unboxed(state), budget <= 0, outputs))
    outputs = StepOutput(*(_box(jnp.moveaxis(x, 0, 1), *n) for x, n in zip(outputs, _LOOP_OUTPUT_NAMES)))
    return state, outputs, steps

  def _loop_outputs(self, rows: int) -> StepOutput:
    """The loop's outputs, abstract (what `_loop_fn` returns beside the state), without tracing it."""
    layers = 0 if self.engram is None else len(self.engram.layer_ids)
    shapes = (((rows, self.block), jnp.int32), ((rows, self.block), jnp.float32),
              ((rows, self.block, layers), jnp.float32))
    return StepOutput(*(_box(jax.ShapeDtypeStruct(shape, dtype), *names)
                        for (shape, dtype), names in zip(shapes, _LOOP_OUTPUT_NAMES)))

  def _head_fn(self, params, model_state, cache, tokens, positions):
    """Split decoding: the blocks before the first Engram layer -> (residual streams, cache)."""
    batch = {"tokens": tokens[:, None], "positions": positions[:, None]}
    (streams, _), mutated = forward(self.cfg.model, params, {**model_state, CACHE_COLLECTION: cache}, batch,
                                    mutable=[CACHE_COLLECTION], cache_mode="decode", part="head",
                                    split_layer=self.split_layer)
    return streams, mutated[CACHE_COLLECTION]

  def _host_blocks_fn(self, params, model_state, state, tokens, logprobs, history, feed, operand, engram_scale,
                      sampling, lookup, streams=None):
    """Host tables: the blocks (or their tail) on the gathered rows, then the next step's sample."""
    operand, triggers = operand
    rows = self.runner.source.rows(params, feed, operand, None)
    rows, window = self._triggered(rows, state, tokens, triggers)
    new_state, out = self._blocks_fn(params, model_state, state, tokens, logprobs, history, rows, engram_scale, streams,
                                     window=window)
    return new_state._replace(pending=self._sample_fn(nn.meta.unbox(new_state), sampling, lookup)), out

  def _compile(self, rows: int, prompt_length: int, cache_length: int, example) -> "_Programs":
    """The jitted prefill and decode step of one (rows, prompt length, cache length) bucket, with the
    state's shardings derived from its logical axis names and the state donated to each step."""
    window = example[2].get("trigger_window")
    key = (rows, prompt_length, cache_length, None if window is None else window.shape[1])
    if key in self._programs:
      return self._programs[key]
    params, model_state, batch, history, scale = example[:5]
    prefill = lambda *a: self._prefill_fn(*a, cache_length=cache_length)  # noqa: E731
    sampling = Sampling(*(jax.ShapeDtypeStruct((rows,), d) for d in
                          (jnp.float32, jnp.int32, jnp.float32, jnp.int32, jnp.int32)))

    tables = self._abstract_step_operand()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
      abstract = jax.eval_shape(prefill, *example)
    # The step's new state is laid out like the one it donates (its cache comes back unboxed from a
    # decode-mode apply, so its names are the prefill's); its outputs have their own names.
    state_shardings = tree_shardings(abstract, self.mesh)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    loop_shardings = (state_shardings, tree_shardings(self._loop_outputs(rows), self.mesh), replicated)
    prefill_jit = jax.jit(lambda *a: nn.meta.unbox(prefill(*a)), out_shardings=state_shardings)
    state = _unbox_abstract(abstract)
    state_key = _shapes(state._replace(pending=None))

    def step_shardings():
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        step_abstract = jax.eval_shape(self._step_fn, params, model_state, state, sampling, self.lookup, scale, tables)
      return state_shardings, tree_shardings(step_abstract[1], self.mesh)

    if state_key not in self._steps:
      if self.path == "split":
        step = _HostStep(self, state_shardings, step_shardings())
      else:  # generate() decodes with the loop: the one-step program is traced only if step() is called
        step = _Lazy(lambda: jax.jit(lambda *a: nn.meta.unbox(self._step_fn(*a)), out_shardings=step_shardings(),
                                     donate_argnums=(2,)))
      loop = jax.jit(lambda *a: nn.meta.unbox(self._loop_fn(*a)), out_shardings=loop_shardings, donate_argnums=(2,))
      self._steps[state_key] = (step, loop)
      self.compiled.append(("step", rows, cache_length))
    self.compiled.append(("prefill",) + key[:3])
    with_sharding = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    batch_sharding = place_sharding(self.mesh, 1)
    self._programs[key] = _Programs(
        prefill=prefill_jit, step=self._steps[state_key][0], loop=self._steps[state_key][1], state=jax.tree.map(with_sharding, state, state_shardings),
        sampling=Sampling(*(with_sharding(x, batch_sharding) for x in sampling)))
    return self._programs[key]

  def programs(self, rows: int, prompt_length: int, cache_length: int) -> Dict[str, Tuple[Callable, tuple]]:
    """{"prefill", "step", "loop": (jitted, abstract args)} of one bucket, every argument a
    ShapeDtypeStruct with its sharding: what `jax.export` and the benchmarks need (nothing is run).
    Trace them (call, lower, export) with the mesh and the logical axis rules set. The device and
    pinned_host paths only: a host callback (and the split path's host gather) is not a program's."""
    if self.path not in ("device", "pinned_host"):
      raise ValueError(f"programs() exports the decode programs of the device and pinned_host paths; this "
                       f"generator's path is {self.path} (tables on {self.placement})")
    engram = self.engram
    sharded = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=place_sharding(self.mesh, len(shape)))  # noqa: E731
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
    params = jax.tree.map(abstract, self.runner.params)
    model_state = jax.tree.map(abstract, self.runner.model_state)
    batch = {k: sharded((rows, prompt_length), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    if engram is not None:
      batch["engram_ids"] = sharded((rows, prompt_length, len(engram.layer_ids), engram.num_heads), jnp.int32)
    history = sharded((rows, engram.max_ngram_size - 1 if engram is not None else 0), jnp.int32)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    scale = jax.ShapeDtypeStruct((len(self.runner.engram_layers),), jnp.float32, sharding=replicated)
    feed = None
    if self.engram is not None:  # prefill's rows: for host tables one batch's distinct rows per shard
      feed = jax.tree.map(abstract, self.runner.source.rows_for(np.zeros(batch["engram_ids"].shape, np.int32)))
    example = (params, model_state, batch, history, scale, feed, None)
    p = self._compile(rows, prompt_length, cache_length, example)
    lookup = None if self.lookup is None else abstract(self.lookup)
    tables = self._abstract_step_operand()
    budget = sharded((rows,), jnp.int32)
    return {"prefill": (p.prefill, example),
            "step": (p.step, (params, model_state, p.state, p.sampling, lookup, scale, tables)),
            "loop": (p.loop, (params, model_state, p.state, p.sampling, lookup, scale, tables, budget))}

  # -- buckets and checks ------------------------------------------------------------------------

  def length_bucket(self, length: int) -> int:
    """The padded length of prompts (or caches) of up to `length` tokens: a power of two, at least
    MIN_PROMPT_BUCKET, at most model.max_seq_len."""
    return min(max(MIN_PROMPT_BUCKET, _power_of_two_at_least(length)), self.cfg.model.max_seq_len)

  def batch_bucket(self, rows: int) -> int:
    """The padded rows of a batch of `rows` prompts: a power of two and a multiple of the batch shards."""
    multiple = self.runner.row_multiple
    return -(-_power_of_two_at_least(rows) // multiple) * multiple

  def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    check_prompts(prompts, max_new_tokens, self.cfg.model.max_seq_len, self.cfg.model.vocab_size)

  # -- prefill and step --------------------------------------------------------------------------

  def _place(self, local: Dict[str, np.ndarray]):
    return place_batch(local, self.mesh)

  def prefill(self, prompts: Sequence[Sequence[int]], cache_length: int, engram_scale=None) -> DecodeState:
    """Runs right-padded prompts (rows a multiple of the mesh's batch shards) and returns the state
    whose logits are each row's last; the caches hold `cache_length` positions."""
    rows = len(prompts)
    if rows % self.runner.row_multiple:
      raise ValueError(f"{rows} prompt rows: expected a multiple of the mesh's {self.runner.row_multiple} batch shards")
    longest = max(len(p) for p in prompts)
    if cache_length < longest or cache_length > self.cfg.model.max_seq_len:
      raise ValueError(f"cache_length={cache_length}: expected between the longest prompt ({longest}) and "
                       f"model.max_seq_len={self.cfg.model.max_seq_len}")
    length = min(self.length_bucket(longest), cache_length)
    batch = self.runner.make_batch(prompts, length)
    del batch["targets"]
    lengths = np.array([len(p) for p in prompts], np.int32)
    history = (self.hashing.history_numpy(batch["tokens"], lengths) if self.engram is not None
               else np.zeros((rows, 0), np.int32))
    feed, source = None, self.runner.source
    if self.engram is not None:  # the prompts' rows
      ids = batch["engram_ids"] if source.ids_in_graph else batch.pop("engram_ids")
      feed = source.rows_for(ids, mask=batch["segment_ids"] > 0)
      if source.triggers is not None:  # matched on the host, as evaluation does; the window goes on decoding
        batch["trigger_ids"] = source.trigger_ids(batch["tokens"], batch["segment_ids"])
        batch["trigger_window"] = trigger_lib.window_numpy(batch["tokens"], lengths, source.triggers.width)
    placed = self._place({**batch, "history": history})
    history = placed.pop("history")
    scale = jnp.asarray(self.runner.scale() if engram_scale is None else np.asarray(engram_scale, np.float32))
    example = (self.runner.params, self.runner.model_state, placed, history, scale, feed, source.operand(),
               source.trigger_operand())
    prefill_jit = self._compile(rows, length, cache_length, example).prefill
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
      return prefill_jit(*example)

  def step(self, state: DecodeState, sampling: Sampling, engram_scale=None) -> Tuple[DecodeState, StepOutput]:
    """One decode step (the state is donated: use the returned one)."""
    program, _ = self._programs_for(state)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
      return program(*self._arguments(state, sampling, engram_scale))

  def advance(self, state: DecodeState, sampling: Sampling, budget, engram_scale=None
             ) -> Tuple[DecodeState, StepOutput, int]:
    """Up to `block` decode steps in one program (the state is donated): (state, outputs [B, block,
    ...] of which the first `steps` are real, steps). `budget` [B]: tokens each row may still produce
    (0 for a row that has ended); the program stops early once every row has produced an
    end-of-sequence token or its budget. The split path steps once."""
    program, loop = self._programs_for(state)
    if self.path == "split":
      state, out = self.step(state, sampling, engram_scale)
      return state, StepOutput(*(x[:, None] for x in out)), 1
    budget = self._place({"budget": np.asarray(budget, np.int32)})["budget"]
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
      state, out, steps = loop(*self._arguments(state, sampling, engram_scale), budget)
    return state, out, int(steps)

  def _programs_for(self, state: DecodeState):
    programs = self._steps.get(_shapes(state._replace(pending=None)))
    if programs is None:
      raise ValueError("no decode program for this state's shapes: pass a state that prefill (or step) returned")
    return programs

  def _arguments(self, state: DecodeState, sampling: Sampling, engram_scale):
    if not isinstance(sampling.temperature, jax.Array):
      sampling = self._placed("sampling", sampling, lambda v: Sampling(*self._place(dict(zip(Sampling._fields, v))).values()))
    scale = self.runner.scale() if engram_scale is None else np.asarray(engram_scale, np.float32)
    scale = self._placed("scale", (scale,), lambda v: jnp.asarray(v[0]))
    return (self.runner.params, self.runner.model_state, state, sampling, self.lookup, scale, self._step_operand())

  def _placed(self, key: str, host_values: Sequence, place: Callable):
    """`place(host_values)`, reused while the host values stay equal: a decode loop passes the same
    sampling parameters and scale every step, and placing them anew costs a transfer per step (and,
    with host tables, would discard the sample drawn ahead, which is tied to the placed arrays)."""
    last = self._placed_cache.get(key)
    if last is not None and len(last[0]) == len(host_values) and all(
        np.shape(a) == np.shape(b) and np.array_equal(a, b) for a, b in zip(last[0], host_values)):
      return last[1]
    placed = place(host_values)
    self._placed_cache[key] = (tuple(np.array(v, copy=True) for v in host_values), placed)
    return placed

  # -- the loop ----------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature=0.0, top_k=0,
               top_p=1.0, seed: int = 0, batch_size: int = 8, engram_off: Sequence[int] = (),
               on_token: Optional[Callable[[int, int], None]] = None,
               on_done: Optional[Callable[[int, "Completion"], None]] = None) -> List[Completion]:
    """Completions of token-id prompts, in order, `batch_size` prompts per batch.

    Each row stops at end-of-sequence or after `max_new_tokens`. `temperature`, `top_k`,
    `top_p` are scalars or one value per prompt; prompt i samples with key(seed) folded with i,
    so its tokens do not depend on the batch it lands in. `on_token(prompt index, token id)` is
    called as each token is produced (streaming), `on_done(prompt index, completion)` as each prompt
    finishes. `engram_off` knocks out those Engram layers.
    """
    self.check_prompts(prompts, max_new_tokens)
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    n = len(prompts)
    per_prompt = lambda v: np.broadcast_to(np.asarray(v), (n,))  # noqa: E731
    try:
      temperature, top_k, top_p = per_prompt(temperature), per_prompt(top_k), per_prompt(top_p)
    except ValueError:
      raise ValueError(f"temperature/top_k/top_p: expected scalars or {n} values (one per prompt)") from None
    sampling_arrays(n, temperature, top_k, top_p, seed)  # validates before anything runs
    scale = self.runner.scale(engram_off)
    out: List[Optional[Completion]] = [None] * n
    for start in range(0, n, batch_size):
      index = list(range(start, min(n, start + batch_size)))
      done = self._generate_batch([list(prompts[i]) for i in index], index, max_new_tokens,
                                  sampling_arrays(len(index), temperature[index], top_k[index], top_p[index],
                                                  seed, index), scale, on_token, on_done)
      for i, completion in zip(index, done):
        out[i] = completion
    return out

  def _generate_batch(self, prompts, index, max_new_tokens, sampling: Sampling, scale, on_token, on_done):
    real = len(prompts)
    rows = self.batch_bucket(real)
    padded = prompts + [[self.runner.pad_id]] * (rows - real)
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], rows - real)])  # noqa: E731
    sampling = Sampling(*(pad(np.asarray(v)) for v in sampling))
    cache_length = self.length_bucket(max(len(p) for p in prompts) + max_new_tokens)
    clock = _Clock()
    state = jax.block_until_ready(self.prefill(padded, cache_length, scale))
    seconds, compiled = clock.stop()
    self.timing.prefill_seconds += seconds
    self.timing.compile_seconds += compiled
    self.timing.prompt_tokens += sum(len(p) for p in prompts)
    placed = Sampling(*self._place(dict(zip(Sampling._fields, sampling))).values())
    completions = [Completion(list(map(int, p)), [], [], [], "length") for p in prompts]
    finished = np.zeros(real, bool)
    produced = 0  # tokens each unfinished row has so far (rows step together)
    while not finished.all():
      budget = np.where(np.concatenate([finished, np.ones(rows - real, bool)]), 0, max_new_tokens - produced)
      clock = _Clock()
      state, out, steps = self.advance(state, placed, budget, scale)
      tokens, logprobs, gates = (gather_global(x) for x in out)
      seconds, compiled = clock.stop()
      self.timing.decode_seconds += seconds
      self.timing.compile_seconds += compiled
      for t in range(steps):
        produced += 1
        for b in np.flatnonzero(~finished):
          c = completions[b]
          c.token_ids.append(int(tokens[b, t]))
          self.timing.new_tokens += 1
          c.logprobs.append(float(logprobs[b, t]))
          c.gate_means.append([float(g) for g in gates[b, t]])
          if on_token is not None:
            on_token(index[b], int(tokens[b, t]))
          if tokens[b, t] == self.eos_id or len(c.token_ids) == max_new_tokens:
            finished[b] = True
            c.finish_reason = "eos" if tokens[b, t] == self.eos_id else "length"
            if on_done is not None:
              on_done(index[b], c)
    return completions

  # -- text --------------------------------------------------------------------------------------

  def encode_prompt(self, text: str) -> List[int]:
    return encode_prompt(self.runner.tokenizer, self.cfg.data, text)

  def decode(self, token_ids: Sequence[int]) -> str:
    return self.runner.tokenizer.decode(list(token_ids), skip_special_tokens=True)


class _HostStep:
  """A decode step whose Engram rows come from host tables: a host gather between two programs.

    head    (split decoding) the blocks before the first Engram layer on the step's tokens,
            dispatched first, so the device computes them while the host gathers the step's rows
            (from the tables, minus the hot-row cache) and places them on the batch's devices;
    rest    the blocks from the first Engram layer on (all blocks without the split) on those rows,
            the LM head, and then the *next* step's sample and hash ids (`DecodeState.pending`).

  The tokens a step feeds the model were sampled at the end of the previous step, so their hash ids
  are on the host by the time the step starts: nothing waits for them. The sample drawn ahead is used
  only for the state it was drawn from (the same logits, positions and history arrays) and the same
  sampling arrays; otherwise (the first step after a prefill, a state from elsewhere, other sampling
  arrays) the step samples first with its own small program. Sampling is a function of the logits
  and the parameters (the key is the row's seed, index and position), so sampling ahead draws exactly
  the tokens the device step draws. Decode rows are padded to one row bucket (every lookup of the
  step), so a generation compiles one `rest` program per state shape.
  """

  def __init__(self, generator: "Generator", state_shardings: DecodeState, step_shardings):
    self.generator = generator
    mesh = generator.mesh
    by_batch = lambda ndim: place_sharding(mesh, ndim)  # noqa: E731
    pending = (by_batch(1), by_batch(1), by_batch(4), state_shardings.history)
    self.sample = jax.jit(lambda *a: nn.meta.unbox(generator._sample_fn(*a)), out_shardings=pending)
    self.head = None
    if generator.split_layer is not None:
      self.head = jax.jit(lambda *a: nn.meta.unbox(generator._head_fn(*a)),
                          out_shardings=(by_batch(4), state_shardings.cache), donate_argnums=(2,))
    new_state, outputs = step_shardings
    self.rest = jax.jit(lambda *a: nn.meta.unbox(generator._host_blocks_fn(*a)),
                        out_shardings=(new_state._replace(pending=pending), outputs), donate_argnums=(2,))
    self._drawn_from: Tuple = ()  # what the last pending sample was drawn from (see __call__)

  @staticmethod
  def _origin(state: DecodeState, sampling: Sampling) -> Tuple:
    return (state.logits, state.positions, state.history) + tuple(sampling)

  def __call__(self, params, model_state, state: DecodeState, sampling: Sampling, lookup, engram_scale, tables=None):
    runner = self.generator.runner
    origin = self._origin(state, sampling)
    drawn_here = len(origin) == len(self._drawn_from) and all(a is b for a, b in zip(origin, self._drawn_from))
    pending = state.pending if drawn_here else None
    if pending is None:
      pending = self.sample(state, sampling, lookup)
    tokens, logprobs, engram_ids, history = pending
    state = state._replace(pending=None)
    streams = None
    if self.head is not None:
      streams, cache = self.head(params, model_state, state.cache, tokens, state.positions)  # donates the cache
      state = state._replace(cache=cache)
    try:
      ids = gather_global(engram_ids)
      feed = runner.source.rows_for(ids, pad_to=ids.shape[0] // runner.row_multiple * ids.shape[1] * ids.shape[3])
    except Exception as e:
      raise RuntimeError("reading this decode step's Engram rows from the host tables failed; the decode state "
                         "given to the step was consumed (its cache was donated): start again from prefill") from e
    new_state, out = self.rest(params, model_state, state, tokens, logprobs, history, feed,
                               (runner.source.operand(), runner.source.trigger_operand()), engram_scale, sampling,
                               lookup, streams)
    self._drawn_from = self._origin(new_state, sampling)
    return new_state, out


def _unbox_abstract(tree):
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _shapes(tree) -> Tuple:
  return tuple(tuple(leaf.shape) for leaf in jax.tree.leaves(tree))


class TextStream:
  """Incremental detokenisation for streaming: `push(token)` returns the text it adds (held back while
  the text ends in an incomplete UTF-8 character, which byte-level BPE pieces can split)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ids: List[int] = []
    self.emitted = 0

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):
      return ""
    new, self.emitted = text[self.emitted:], len(text)
    return new


# ----------------------------------------------------------------------------------------------
# Checks of the model against its Engram config.


def check_tables(cfg: Config, params, host_rows: Optional[Dict[str, np.ndarray]] = None) -> None:
  """The params (or, given, the host tables' rows {name: [R, d]}) hold exactly the tables
  `cfg.model.engram` describes (names and shapes)."""
  tables = memory.split(params)[1] if host_rows is None else host_rows
  engram = cfg.model.engram
  want = {} if engram is None else {memory.table_name(l): (memory.table_layout(engram, l)[2], engram.head_dim)
                                    for l in engram.layer_ids}
  got = {name: tuple(t.shape) for name, t in tables.items()}
  if got != want:
    where = "the parameters hold" if host_rows is None else "the host tables are"
    raise ValueError(f"{where} Engram tables {got or 'none'}, but model.engram={engram} describes "
                     f"{want or 'none'}: generate with the Engram config the model was trained with")


# ----------------------------------------------------------------------------------------------
# Output.


def completion_record(generator: Generator, prompt: str, completion: Completion) -> Dict[str, Any]:
  """One JSONL line of generate.py's --output_jsonl."""
  layers = list(generator.engram.layer_ids) if generator.engram is not None else []
  return {"prompt": prompt, "completion": generator.decode(completion.token_ids),
          "token_ids": completion.token_ids, "logprobs": completion.logprobs, "engram_layers": layers,
          "engram_gate_means": completion.gate_means, "finish_reason": completion.finish_reason,
          "prompt_tokens": len(completion.prompt_ids)}


def read_prompts(path: str) -> List[str]:
  """Prompts from a file: JSONL with a "prompt" field per line (when the file ends in .jsonl or its
  first line is a JSON object), else one prompt per non-empty line."""
  import os

  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f]
  first = next((line for line in lines if line.strip()), "")
  if path.endswith(".jsonl") or first.lstrip().startswith("{"):
    prompts = []
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not a JSON object ({e}): expected {{\"prompt\": ...}} per line") from None
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{path}:{n}: expected a JSON object with a string \"prompt\" field")
      prompts.append(record["prompt"])
  else:
    prompts = [line for line in lines if line.strip()]
  if not prompts:
    raise ValueError(f"prompts file {path!r} holds no prompt")
  return prompts
