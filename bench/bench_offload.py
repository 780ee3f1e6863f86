"""Engram tables off the accelerator: what placement, prefetch, a hot-row cache and quantized rows cost.

Parts (`--parts`, comma-separated; each prints one JSON object on its own line):

  throughput  The same model, prompts and batches under every placement: `device` (tables in the
              params, in-graph gather), `host` without prefetch, `host` with prefetch, `host` with
              prefetch + a hot-row cache at three sizes, `disk` with a warm and a cold page cache
              (cold: the table files' pages are dropped with posix_fadvise before each repeat).
              Scoring tokens/s (the forward over right-padded prompts of uniform random lengths),
              median over repeats, and each one's ratio to `device`, all in one run.
  decode      Generation under every decode path (generation.DECODE_PATHS): prefill and decode
              tokens/s at each --decode_batches size for device tables (one step per dispatch and
              the --decode_block-step loop), host tables (the split step, the in-graph callback and
              the in-graph pinned-host gather, one step and the loop; the callback with hot-row
              caches) and disk tables (callback loop, warm and cold), each path's tokens checked
              equal; then one split decode step's phases timed serially.
  breakdown   One batch's host and device times, serially: hash (hash_numpy of the tokens), host
              gather (offload.prepare_rows), transfer (device_put + wait), compute (the jitted forward
              given the placed rows), and the device placement's whole forward for reference.
  hitrate     Hot-row cache hit rate against cache size on the embedded held-out text, the cache
              chosen from the start of the training split (as the runner does), per layer, order and
              overall; next to an LRU of the same size run over the same stream (the alternative to a
              static cache). Writes a PNG plot with `--plot`.
  quantize    Held-out loss of a tiny model trained for `--train_steps` steps with its tables stored
              as float32, bfloat16, int8 and float8_e4m3 (host placement), and bytes per row.
  bigdisk     Evaluation from a memory-mapped table of `--big_gb` GB (a synthetic table written chunk by
              chunk into `--big_dir`, deleted afterwards unless --keep_big): tokens/s and this process's
              peak resident memory (VmHWM) against the machine's RAM.

  python bench/bench_offload.py --parts throughput,breakdown,hitrate,quantize \\
      [--rows_per_head 1000003] [--batches 8] [--batch 16] [--seq 128] [--repeats 5]
  python bench/bench_offload.py --parts bigdisk --big_gb 36 --big_dir /some/disk/dir
  python bench/bench_offload.py --paper ...   # GPU setup: 512 prompts of 100-1024 tokens, tens of GB of tables

Every model here is the `tiny` preset (random backbone unless trained for `quantize`), with its
Engram tables widened to `--rows_per_head` rows per head so that the host gather is not free.
On CPU "device" and host memory are the same RAM, so the ratios measure orchestration cost (host
gather, transfer bookkeeping, thread hand-off), not a PCIe link.
"""

import argparse
import collections
import dataclasses
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engram_jax import data as data_lib  # noqa: E402
from engram_jax import memory, offload  # noqa: E402
from engram_jax import runner as runner_lib  # noqa: E402
from engram_jax.config import MeshConfig, load_preset  # noqa: E402
from engram_jax.model import Decoder, init_variables  # noqa: E402
from engram_jax.patches import fingerprint  # noqa: E402
from engram_jax.sharding import LOGICAL_RULES, make_mesh  # noqa: E402


def config(rows_per_head: int, batch: int, seq: int):
  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  e = dataclasses.replace(cfg.model.engram, vocab_size_per_ngram=(rows_per_head,) * cfg.model.engram.num_orders)
  model = dataclasses.replace(cfg.model, engram=e, max_seq_len=max(seq, cfg.model.max_seq_len))
  data = dataclasses.replace(cfg.data, batch_size=batch, seq_len=seq)
  return dataclasses.replace(cfg, model=model, data=data, mesh=MeshConfig(data=-1))


def backbone_variables(cfg, mesh, with_tables: bool):
  """Random variables; the tables (if asked) in the params, else the backbone alone (never allocating a
  table, so a table bigger than RAM works)."""
  e = cfg.model.engram

  def init():
    if with_tables:
      return nn.meta.unbox(init_variables(cfg.model, jax.random.key(0)))
    rows = {n: jnp.zeros((1, 8, e.num_heads, e.head_dim)) for n in memory.table_names(e)}
    return nn.meta.unbox(dict(Decoder(cfg.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                                      engram_rows=rows)))

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(init)()
  params = variables.pop("params")
  return params, dict(variables)


def prompt_batches(runner, num_batches: int, rng, min_len: int, max_len: int):
  """Batches of right-padded prompts (held-out text cut at uniform random lengths), with hash ids."""
  corpus = data_lib.tokenized_split(runner.cfg.data, "eval", runner.tokenizer).tokens
  out = []
  B, T = runner.batch_rows, runner.cfg.data.seq_len
  for _ in range(num_batches):
    rows = []
    for _ in range(B):
      n = int(rng.integers(min_len, max_len + 1))
      start = int(rng.integers(0, len(corpus) - n))
      rows.append(corpus[start:start + n])
    out.append(runner.make_batch(rows, T))
  return out


def run_pass(runner, batches):
  t0 = time.perf_counter()
  tokens = 0
  for batch, prepared in runner.prepared(batches):
    out = runner.forward(prepared)
    tokens += int((batch["segment_ids"] > 0).sum())
  del out
  return tokens / (time.perf_counter() - t0)


def drop_page_cache(table_dir: str):
  for name in os.listdir(table_dir):
    fd = os.open(os.path.join(table_dir, name), os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def placements(cfg, mesh, work):
  """One random model: (params, model state, a device-placement runner, host tables, disk tables, the
  table directory both read)."""
  params, state = backbone_variables(cfg, mesh, with_tables=True)
  device = runner_lib.ModelRunner(cfg, params, state, mesh)
  tables_np = {k: np.asarray(v) for k, v in memory.split(params)[1].items()}
  fp = fingerprint(cfg.model, device.hashing)
  table_dir = os.path.join(work, "tables")
  if not os.path.exists(table_dir):
    offload.write_table_dir(table_dir, cfg.model, fp, lambda n, a, b: tables_np[n][a:b], log=lambda s: None)
  host = offload.HostTables.open(table_dir, cfg.model, fp, "host")
  disk = offload.HostTables.open(table_dir, cfg.model, fp, "disk")
  return params, state, device, host, disk, table_dir


def part_throughput(args, cfg, mesh, work):
  params, state, device, host, disk, table_dir = placements(cfg, mesh, work)
  rng = np.random.default_rng(0)
  batches = prompt_batches(device, args.batches, rng, args.min_prompt, args.max_prompt)
  reference = runner_lib.reference_ids(device, args.reference_tokens)
  modes = {"device": (device, None),
           "host_no_prefetch": (runner_lib.ModelRunner(cfg, params, state, mesh, tables=host, prefetch=False), None),
           "host_prefetch": (runner_lib.ModelRunner(cfg, params, state, mesh, tables=host), None)}
  for k in args.cache_sizes:
    r = runner_lib.ModelRunner(cfg, params, state, mesh, tables=host,
                               cache=offload.HotRowCache.build(host, reference, k))
    modes[f"host_prefetch_cache_{k}"] = (r, None)
  modes["disk_warm"] = (runner_lib.ModelRunner(cfg, params, state, mesh, tables=disk), None)
  modes["disk_cold"] = (modes["disk_warm"][0], table_dir)
  times = collections.defaultdict(list)
  for name, (r, _) in modes.items():  # compile every program (row buckets included) before timing
    run_pass(r, batches)
  for _ in range(args.repeats):  # interleaved, so machine load drifts hit every mode alike
    for name, (r, cold_dir) in modes.items():
      if cold_dir:
        drop_page_cache(cold_dir)
      times[name].append(run_pass(r, batches))
  med = {k: statistics.median(v) for k, v in times.items()}
  hit = {}
  for name, (r, _) in modes.items():
    if r.cache is not None:
      r.hit_counter.reset()
      for b in batches:
        r.prepare(b)
      rep = r.hit_counter.report(cfg.model.engram, r.cache.size)
      hit[name] = [l["hit_rate"] for l in rep["layers"]]
  table_mb = host.nbytes / 2**20
  return {"part": "throughput", "table_MiB": round(table_mb, 1), "batches": len(batches), "batch": device.batch_rows,
          "seq": cfg.data.seq_len, "prompt_tokens": [args.min_prompt, args.max_prompt],
          "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
          "time_ratio_vs_device": {k: round(med["device"] / v, 4) for k, v in med.items()},
          "cache_hit_rate_per_layer": hit}


def part_breakdown(args, cfg, mesh, work):
  params, state = backbone_variables(cfg, mesh, with_tables=True)
  device = runner_lib.ModelRunner(cfg, params, state, mesh)
  host = offload.HostTables.from_arrays(cfg.model.engram, {k: np.asarray(v) for k, v in memory.split(params)[1].items()})
  runner = runner_lib.ModelRunner(cfg, params, state, mesh, tables=host, prefetch=False)
  rng = np.random.default_rng(1)
  batch = prompt_batches(device, 1, rng, args.seq, args.seq)[0]
  shards = runner.row_multiple
  out = collections.defaultdict(list)
  for i in range(args.repeats + 1):
    t0 = time.perf_counter()
    ids = runner.hashing.hash_numpy(batch["tokens"])
    t1 = time.perf_counter()
    rows = offload.prepare_rows(host, None, ids, shards)
    t2 = time.perf_counter()
    placed = jax.block_until_ready({n: {k: jax.device_put(v, runner_lib.batch_sharding(mesh, v.ndim))
                                        for k, v in e.items()} for n, e in rows.items()})
    t3 = time.perf_counter()
    prepared = runner.prepare(batch)
    t4 = time.perf_counter()
    runner.forward(prepared)
    t5 = time.perf_counter()
    device.forward(batch)
    t6 = time.perf_counter()
    if i:
      for k, v in (("hash", t1 - t0), ("host_gather", t2 - t1), ("transfer", t3 - t2), ("compute_with_rows", t5 - t4),
                   ("device_forward", t6 - t5)):
        out[k].append(v * 1e3)
  del placed
  rows_sent = sum(e["rows"].shape[0] * e["rows"].shape[1] for e in rows.values())
  return {"part": "breakdown", "batch": list(batch["tokens"].shape), "ms": {k: round(statistics.median(v), 3)
                                                                           for k, v in out.items()},
          "distinct_rows_sent_incl_padding": rows_sent,
          "lookups": int(np.prod(ids.shape))}


def decode_pass(gen, prompts, new_tokens: int, cold_dir=None):
  """(prefill tokens/s, decode tokens/s, tokens [R, new_tokens]) of one batch of prompts, greedy,
  through `Generator.advance` as generate() drives it: up to the generator's block of steps per
  dispatch, each dispatch's tokens fetched to the host (for streaming and end-of-sequence)."""
  from engram_jax import generation

  if cold_dir:
    drop_page_cache(cold_dir)
  cache_length = gen.length_bucket(max(len(p) for p in prompts) + new_tokens)
  sampling = generation.sampling_arrays(len(prompts))
  t0 = time.perf_counter()
  state = gen.prefill(prompts, cache_length)
  jax.block_until_ready(state.logits)
  t1 = time.perf_counter()
  produced, tokens = 0, []
  while produced < new_tokens:
    state, out, steps = gen.advance(state, sampling, np.full(len(prompts), new_tokens - produced, np.int32))
    tokens.append(np.asarray(out.tokens)[:, :steps])
    produced += steps
  t2 = time.perf_counter()
  return sum(len(p) for p in prompts) / (t1 - t0), len(prompts) * new_tokens / (t2 - t1), np.concatenate(tokens, 1)


def part_decode(args, cfg, mesh, work):
  """Generation (prefill + cached decode, greedy, end-of-sequence ignored) under every decode path,
  same model and prompts, at each --decode_batches size: device tables one step per dispatch and
  --decode_block steps per dispatch (the device-side loop); host tables through the split step (the
  blocks before the first Engram layer run while the host gathers), the in-graph callback (one step
  and the loop, with hot-row caches of --cache_sizes rows) and, where the platform has pinned host
  memory and the mesh is one device, the in-graph pinned-host gather (one step and the loop); disk
  tables through the callback loop, warm and cold. Every path must produce the same tokens. Then one
  split decode step's phases, serially."""
  from engram_jax import generation

  params, state, device, host, disk, table_dir = placements(cfg, mesh, work)
  reference = runner_lib.reference_ids(device, args.reference_tokens)
  rng = np.random.default_rng(2)
  corpus = data_lib.tokenized_split(cfg.data, "eval", device.tokenizer).tokens
  quiet = lambda s: None  # noqa: E731
  K = args.decode_block
  make = lambda tables, path, block, cache=None: generation.Generator(  # noqa: E731
      runner_lib.ModelRunner(cfg, params, state, mesh, tables=tables, cache=cache), log=quiet, decode=path,
      block=block)
  modes = {"device_step": (generation.Generator(device, log=quiet, block=1), None),
           f"device_loop{K}": (generation.Generator(device, log=quiet, block=K), None),
           "host_split_step": (make(host, "split", 1), None),
           "host_callback_step": (make(host, "callback", 1), None),
           f"host_callback_loop{K}": (make(host, "callback", K), None)}
  if mesh.devices.size == 1 and generation.pinned_host_supported(mesh):
    modes["host_pinned_step"] = (make(host, "pinned_host", 1), None)
    modes[f"host_pinned_loop{K}"] = (make(host, "pinned_host", K), None)
  for k in args.cache_sizes:
    modes[f"host_callback_loop{K}_cache_{k}"] = (make(host, "callback", K, offload.HotRowCache.build(host, reference, k)),
                                                 None)
  modes[f"disk_warm_loop{K}"] = (make(disk, "callback", K), None)
  modes[f"disk_cold_loop{K}"] = (modes[f"disk_warm_loop{K}"][0], table_dir)
  if cfg.model.max_seq_len - args.new_tokens < args.min_prompt:
    raise SystemExit(f"--min_prompt {args.min_prompt} + --new_tokens {args.new_tokens} exceed max_seq_len "
                     f"{cfg.model.max_seq_len}: raise --seq (max_seq_len is the larger of --seq and the preset's)")
  default_host = generation.default_decode_path("host", mesh)
  host_default = f"host_{'pinned' if default_host == 'pinned_host' else 'callback'}_loop{K}"
  results = {}
  for rows in args.decode_batches:
    prompts = []
    for _ in range(rows):
      n = int(rng.integers(args.min_prompt, min(args.max_prompt, cfg.model.max_seq_len - args.new_tokens) + 1))
      start = int(rng.integers(0, len(corpus) - n))
      prompts.append([int(t) for t in corpus[start:start + n]])
    tokens = {name: decode_pass(gen, prompts, args.new_tokens)[2] for name, (gen, _) in modes.items()}  # compiles
    prefill, decode = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(args.repeats):  # interleaved: machine load drifts hit every mode alike
      for name, (gen, cold) in modes.items():
        p, d, _ = decode_pass(gen, prompts, args.new_tokens, cold)
        prefill[name].append(p)
        decode[name].append(d)
    med_p = {k: statistics.median(v) for k, v in prefill.items()}
    med_d = {k: statistics.median(v) for k, v in decode.items()}
    base = f"device_loop{K}"
    results[rows] = {"prefill_tokens_per_s": {k: round(v, 1) for k, v in med_p.items()},
                     "decode_tokens_per_s": {k: round(v, 1) for k, v in med_d.items()},
                     # > 1: slower than the device tables' K-step loop (the fastest device path)
                     f"decode_time_ratio_vs_{base}": {k: round(med_d[base] / v, 4) for k, v in med_d.items()},
                     f"loop{K}_speedup_over_one_step_device": round(med_d[base] / med_d["device_step"], 3),
                     f"loop{K}_speedup_over_one_step_host_callback": round(
                         med_d[f"host_callback_loop{K}"] / med_d["host_callback_step"], 3),
                     "host_default_path": host_default,
                     "host_default_time_ratio_vs_device": round(med_d[base] / med_d[host_default], 4),
                     "same_tokens_every_path": all(np.array_equal(t, tokens["device_step"]) for t in tokens.values())}
  # One split step's phases with host tables, each waited for (its programs run serially).
  gen = modes["host_split_step"][0]
  prompts = [[int(t) for t in corpus[:args.min_prompt]]] * max(args.decode_batches)
  state_ = gen.prefill(prompts, gen.length_bucket(args.min_prompt + args.new_tokens))
  step = gen._programs_for(state_)[0]
  sampling = generation.sampling_arrays(len(prompts))
  sampling = generation.Sampling(*gen._place(dict(zip(generation.Sampling._fields, sampling))).values())
  phases = collections.defaultdict(list)
  scale = jnp.asarray(gen.runner.scale())
  pending = step.sample(state_, sampling, gen.lookup)
  for i in range(args.new_tokens):
    tokens_, logprobs, ids, history = pending
    t0 = time.perf_counter()
    streams, cache = jax.block_until_ready(step.head(gen.runner.params, gen.runner.model_state, state_.cache, tokens_,
                                                     state_.positions))
    t1 = time.perf_counter()
    rows_np = offload.prepare_rows(host, None, np.asarray(ids), gen.runner.row_multiple)
    t2 = time.perf_counter()
    placed = jax.block_until_ready(jax.device_put(rows_np, {n: {k: runner_lib.batch_sharding(mesh, v.ndim)
                                                                for k, v in e.items()} for n, e in rows_np.items()}))
    t3 = time.perf_counter()
    state_, out = jax.block_until_ready(step.rest(gen.runner.params, gen.runner.model_state,
                                                  state_._replace(cache=cache, pending=None), tokens_, logprobs,
                                                  history, placed, None, scale, sampling, gen.lookup, streams))
    t4 = time.perf_counter()
    pending = state_.pending
    if i >= 2:
      for k, v in (("blocks_before_first_engram_layer", t1 - t0), ("host_gather", t2 - t1), ("transfer", t3 - t2),
                   ("rest_of_step_and_next_sample", t4 - t3)):
        phases[k].append(v * 1e3)
  return {"part": "decode", "table_MiB": round(host.nbytes / 2**20, 1), "new_tokens": args.new_tokens,
          "decode_block": K, "prompt_tokens": [args.min_prompt, args.max_prompt], "by_batch": results,
          "step_phases_ms_batch": max(args.decode_batches),
          "step_phases_ms": {k: round(statistics.median(v), 3) for k, v in phases.items()}}


def lru_hit_rate(stream: np.ndarray, size: int) -> float:
  cache = collections.OrderedDict()
  hits = 0
  for x in stream.tolist():
    if x in cache:
      hits += 1
      cache.move_to_end(x)
    else:
      cache[x] = None
      if len(cache) > size:
        cache.popitem(last=False)
  return hits / max(1, len(stream))


def transfer_per_batch(stream: np.ndarray, batch_lookups: int, reference: np.ndarray, size: int):
  """Rows crossing from the host per batch of `batch_lookups` lookups (distinct misses: repeats within
  a batch cross once anyway) under caches of `size` rows: none; the static top-K of the reference
  sample (what the runner does); the top-K by frequency over the reference plus every batch seen so
  far, rebuilt after each batch; an LRU updated after each batch, starting from the static rows.
  Returns means over batches."""
  counts = collections.Counter(reference.tolist())
  static = set(x for x, _ in counts.most_common(size))
  refreshed = set(static)
  lru = collections.OrderedDict((x, None) for x in static)
  none_, stat_, freq_, lru_ = [], [], [], []
  for start in range(0, len(stream) - batch_lookups + 1, batch_lookups):
    batch = stream[start:start + batch_lookups].tolist()
    distinct = set(batch)
    none_.append(len(distinct))
    stat_.append(len(distinct - static))
    freq_.append(len(distinct - refreshed))
    lru_.append(sum(1 for x in distinct if x not in lru))
    counts.update(batch)
    refreshed = set(x for x, _ in counts.most_common(size))
    for x in distinct:
      lru[x] = None
      lru.move_to_end(x)
    while len(lru) > size:
      lru.popitem(last=False)
  return {"no_cache": float(np.mean(none_)), "static": float(np.mean(stat_)),
          "frequency_refreshed": float(np.mean(freq_)), "lru_per_batch": float(np.mean(lru_))}


def part_hitrate(args, cfg, mesh, work):
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=16, seq_len=128))
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer_path)
  hashing = data_lib.engram_hashing(tokenizer, cfg.model.engram)
  e = cfg.model.engram
  train = data_lib.tokenized_split(cfg.data, "train", tokenizer).tokens
  held = data_lib.tokenized_split(cfg.data, "eval", tokenizer).tokens
  T = 128
  ref = hashing.hash_numpy(train[:args.reference_tokens // T * T].reshape(-1, T))
  ev = hashing.hash_numpy(held[:len(held) // T * T].reshape(-1, T))
  tables = offload.HostTables(e, "host", "float32", {n: np.zeros((memory.table_layout(e, l)[2], 1), np.float32)
                                                     for n, l in zip(memory.table_names(e), e.layer_ids)},
                              {n: None for n in memory.table_names(e)})
  out = {"part": "hitrate", "reference_tokens": int(np.prod(ref.shape[:2])), "eval_tokens": int(np.prod(ev.shape[:2])),
         "rows_per_table": {n: int(r.shape[0]) for n, r in tables.rows.items()}, "sizes": []}
  ev_ids = memory.row_ids(e, ev)
  ref_ids = memory.row_ids(e, ref)
  for k in args.hit_sizes:
    cache = offload.HotRowCache.build(tables, ref, k)
    counter = offload.HitCounter()
    for name in tables.names:
      flat = np.asarray(ev_ids[name]).reshape(-1, e.num_heads)
      counter.add(name, cache.slots(name, flat.reshape(-1)).reshape(flat.shape) >= 0, np.ones(len(flat), bool))
    rep = counter.report(e, k)
    rec = {"rows": k, "share_of_table": k / min(out["rows_per_table"].values()),
           "static": {str(l["layer"]): {"all": l["hit_rate"], **{f"n{o['n']}": o["hit_rate"] for o in l["orders"]}}
                      for l in rep["layers"]}}
    if k <= args.lru_max:
      # Time order: tokens in order, each token's H heads one after another.
      rec["lru"] = {str(l): lru_hit_rate(np.asarray(ev_ids[memory.table_name(l)]).reshape(-1), k) for l in e.layer_ids}
      # What crosses per batch of 16 x 128 tokens: distinct missed rows.
      rec["rows_sent_per_batch"] = {
          str(l): transfer_per_batch(np.asarray(ev_ids[memory.table_name(l)]).reshape(-1), 16 * 128 * e.num_heads,
                                     np.asarray(ref_ids[memory.table_name(l)]).reshape(-1), k) for l in e.layer_ids}
    out["sizes"].append(rec)
  if args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["rows"] for r in out["sizes"]]
    for l in e.layer_ids:
      ax.plot(xs, [r["static"][str(l)]["all"] for r in out["sizes"]], "o-", label=f"layer {l} static top-K")
      for n in range(2, e.max_ngram_size + 1):
        ax.plot(xs, [r["static"][str(l)][f"n{n}"] for r in out["sizes"]], ":", label=f"layer {l} order {n}")
      lx = [r["rows"] for r in out["sizes"] if "lru" in r]
      ax.plot(lx, [r["lru"][str(l)] for r in out["sizes"] if "lru" in r], "s--", label=f"layer {l} LRU")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache rows per table")
    ax.set_ylabel("hit rate (held-out lookups)")
    ax.set_title(f"hot-row cache, tiny preset, {min(out['rows_per_table'].values())} rows per table")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    out["plot"] = os.path.basename(args.plot)
  return out


def part_quantize(args, cfg, mesh, work):
  from engram_jax import evaluation
  from engram_jax.trainer import train

  base = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  tcfg = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=args.train_steps, eval_every=0,
                                                             warmup_steps=min(20, args.train_steps // 4),
                                                             log_every=max(1, args.train_steps)))
  workdir = os.path.join(work, "train")
  train(tcfg, workdir, progress=False, log=lambda s: None)
  ck = os.path.join(workdir, "checkpoints")
  options = evaluation.EvalOptions(max_batches=args.eval_batches, knockout=False, niah_lengths=())
  out = {"part": "quantize", "train_steps": args.train_steps, "eval_batches": args.eval_batches, "kinds": {}}
  ref = None
  device = evaluation.evaluate_checkpoint(tcfg, ck, options, log=lambda s: None)["benchmarks"][0]["loss"]
  for kind in offload.QUANTIZATIONS:
    res = evaluation.evaluate_checkpoint(tcfg, ck, options, engram_tables="host", quantize=kind, log=lambda s: None)
    loss = res["benchmarks"][0]["loss"]
    ref = loss if kind == "float32" else ref
    out["kinds"][kind] = {"bytes_per_row": offload.bytes_per_row(kind, tcfg.model.engram.head_dim), "loss": loss,
                          "loss_change_vs_float32": loss - ref}
  out["device_float32_loss"] = device
  return out


def _vm_hwm() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def part_bigdisk(args, cfg, mesh, work):
  e = cfg.model.engram
  rows_per_head = int(args.big_gb * 1e9 / (4 * e.head_dim * e.num_heads * len(e.layer_ids)))
  cfg = config(rows_per_head, args.batch, args.seq)
  e = cfg.model.engram
  params, state = backbone_variables(cfg, mesh, with_tables=False)
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer_path)
  hashing = data_lib.engram_hashing(tokenizer, e)
  fp = fingerprint(cfg.model, hashing)
  big_dir = os.path.join(args.big_dir, "engram_big_tables")
  block = np.random.default_rng(0).standard_normal((1 << 16, e.head_dim)).astype(np.float32) * 0.02
  t0 = time.perf_counter()
  if not os.path.exists(big_dir):
    offload.write_table_dir(big_dir, cfg.model, fp, lambda n, a, b: block[:b - a], chunk_rows=1 << 16,
                            log=lambda s: None)
  write_s = time.perf_counter() - t0
  total = sum(os.path.getsize(os.path.join(big_dir, f)) for f in os.listdir(big_dir))
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  try:
    tables = offload.HostTables.open(big_dir, cfg.model, fp, "disk")
    try:
      offload.HostTables.open(big_dir, cfg.model, fp, "host")
      host_error = None
    except MemoryError as err:
      host_error = str(err)
    runner = runner_lib.ModelRunner(cfg, params, state, mesh, tables=tables, tokenizer=tokenizer)
    # The same file mapped with the kernel's default readahead (what the mapping had before
    # HostTables.open advised MADV_RANDOM), for the same-run comparison.
    readahead = offload.HostTables.open(big_dir, cfg.model, fp, "disk")
    for mapped in readahead.rows.values():
      mapped._mmap.madvise(mmap.MADV_NORMAL)
    runner_readahead = runner_lib.ModelRunner(cfg, params, state, mesh, tables=readahead, tokenizer=tokenizer)
    batches = data_lib.eval_batches(cfg.data, engram=e, vocab_size=cfg.model.vocab_size,
                                    tokenizer=tokenizer)[:args.big_batches]
    drop_page_cache(big_dir)
    run_pass(runner, batches[:1])  # compile
    rates, rates_readahead = [], []
    for _ in range(args.repeats):
      drop_page_cache(big_dir)
      rates.append(run_pass(runner, batches))
      drop_page_cache(big_dir)
      rates_readahead.append(run_pass(runner_readahead, batches))
    warm = run_pass(runner, batches)
  finally:
    if not args.keep_big:
      shutil.rmtree(big_dir, ignore_errors=True)
  return {"part": "bigdisk", "table_bytes": total, "table_GB": round(total / 1e9, 2), "ram_bytes": ram,
          "table_over_ram": round(total / ram, 3), "rows_per_head": rows_per_head, "write_s": round(write_s, 1),
          "batches": len(batches), "batch": list(batches[0]["tokens"].shape),
          "cold_tokens_per_s_median": round(statistics.median(rates), 1), "warm_tokens_per_s": round(warm, 1),
          "cold_tokens_per_s_median_default_readahead": round(statistics.median(rates_readahead), 1),
          "peak_rss_bytes": _vm_hwm(), "peak_rss_GB": round(_vm_hwm() / 1e9, 2),
          "host_placement_refused": host_error}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="throughput,breakdown,hitrate,quantize")
  p.add_argument("--rows_per_head", type=int, default=1_000_003)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--min_prompt", type=int, default=32)
  p.add_argument("--max_prompt", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--cache_sizes", default="1024,16384,131072")
  p.add_argument("--decode_batches", default="1,32", help="decode: rows per batch (comma-separated)")
  p.add_argument("--new_tokens", type=int, default=32, help="decode: tokens generated per row")
  p.add_argument("--decode_block", type=int, default=16, help="decode: steps per dispatch of the loop paths")
  p.add_argument("--reference_tokens", type=int, default=1 << 17)
  p.add_argument("--hit_sizes", default="256,1024,4096,16384,65536,262144")
  p.add_argument("--lru_max", type=int, default=65536)
  p.add_argument("--plot", default=None)
  p.add_argument("--train_steps", type=int, default=80)
  p.add_argument("--eval_batches", type=int, default=16)
  p.add_argument("--big_gb", type=float, default=36.0)
  p.add_argument("--big_dir", default=None)
  p.add_argument("--big_batches", type=int, default=4)
  p.add_argument("--keep_big", action="store_true")
  p.add_argument("--paper", action="store_true", help="the paper's Table 4 shape (for a GPU): 512 prompts of "
                 "100-1024 tokens, ~20 GB of tables")
  p.add_argument("--gpu", action="store_true", help="the Table 4 shape at a size that fits bench/run_gpu.sh's "
                 "budget: decoding at batch 1 and 32 (128-token prompts, 64 new tokens) under every decode path, then scoring "
                 "prompts of 100-1024 tokens, ~1 GB of tables in host memory")
  p.add_argument("--json", default=None, help="also write every part's result here (rewritten after each part)")
  p.add_argument("--smoke", action="store_true", help="shrink every size (after --gpu/--paper) to check the script "
                 "runs, e.g. on a CPU")
  args = p.parse_args()
  if args.paper or args.gpu:
    args.batch, args.seq, args.min_prompt, args.max_prompt, args.batches = 64, 1024, 100, 1024, 8
    args.rows_per_head = 40_000_003  # 1 Engram layer x 8 heads x 40M rows x 16 x 4 B = ~20 GB
    args.decode_batches, args.new_tokens = "64,512", 32
  if args.gpu:
    # Batch-1 and batch-32 decoding first (every decode path vs device tables), then scoring. ~1 GB of
    # tables: writing and reading a larger table file does not fit the part's 75 s.
    args.parts, args.repeats, args.rows_per_head = "decode,throughput", 3, 2_000_003
    args.decode_batches, args.new_tokens, args.min_prompt, args.max_prompt = "1,32", 64, 128, 128
    args.cache_sizes = "131072"
  if args.smoke:
    args.rows_per_head, args.batches, args.batch, args.repeats, args.cache_sizes = 20011, 1, 4, 1, "64"
    args.seq, args.min_prompt, args.max_prompt, args.decode_batches, args.new_tokens = 256, 100, 200, "1,4", 4
    args.big_gb = min(args.big_gb, 0.05)
  args.cache_sizes = [int(x) for x in args.cache_sizes.split(",")]
  args.decode_batches = [int(x) for x in args.decode_batches.split(",")]
  args.hit_sizes = [int(x) for x in args.hit_sizes.split(",")]
  cfg = config(args.rows_per_head, args.batch, args.seq)
  mesh = make_mesh(cfg.mesh)
  print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                    "devices": jax.device_count(), "jax": jax.__version__}), flush=True)
  work = tempfile.mkdtemp(prefix="bench_offload_")
  results = []
  try:
    for part in args.parts.split(","):
      if part == "bigdisk" and not args.big_dir:
        raise SystemExit("--parts bigdisk needs --big_dir (a directory on the disk to test, with room for --big_gb)")
      fn = {"throughput": part_throughput, "breakdown": part_breakdown, "hitrate": part_hitrate,
            "quantize": part_quantize, "bigdisk": part_bigdisk, "decode": part_decode}[part]
      results.append(fn(args, cfg, mesh, work))
      print(json.dumps(results[-1]), flush=True)
      if args.json:
        with open(args.json, "w") as f:
          json.dump(results, f, indent=1)
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
