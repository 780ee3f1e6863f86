"""Evaluation: benchmark losses and bits per byte, Engram knock-out, gate statistics, and the
orchestration of a whole evaluation with its probes (eval.py is a thin absl main over this).

The model runs through `runner.ModelRunner` (one jitted forward, the knock-out scale an argument);
the needle-in-a-haystack and multiple-choice probes live in `probes.py`.

Definitions (the README's "Evaluation (eval.py)" section documents every number of results.json):
- loss: mean next-token cross-entropy in nats over every predicted token of the documents counted
  (each document's tokens after <bos>, its <eos> included); perplexity = exp(loss).
- bits per byte: total nats / ln 2 / total UTF-8 bytes of those documents' original text, so it
  compares models with different tokenizers. Only documents whose every token was scored count
  (`max_batches` can cut the last one short).
- knock-out (paper section 6.3): the same losses with Engram outputs multiplied by 0 in every layer
  ("all") and in one layer at a time ("layer_<id>"); retained_fraction = full loss / knocked loss
  (1 = the model does not rely on Engram; lower = more reliance), loss_increase = knocked - full.
  For accuracies (needles, multiple choice) retained_fraction = knocked / full accuracy, the paper's
  "retained performance".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from engram_jax import data as data_lib
from engram_jax.config import Config
from engram_jax.model import param_counts
from engram_jax.probes import make_niah_queries, read_mc_file, score_multiple_choice, score_niah
from engram_jax.runner import ModelRunner, gather_global

SCHEMA_VERSION = 1
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_QUANTILE_KEYS = tuple(f"p{int(round(q * 100)):02d}" for q in QUANTILES)

@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What `run_evaluation` measures (eval.py's flags map onto these fields)."""

  # Benchmark sets, each a text/JSONL/Parquet file read as DataConfig reads eval files; None = the
  # config's eval split (the embedded held-out text by default).
  eval_files: Optional[Tuple[str, ...]] = None
  # At most this many batches per set (None = all of it).
  max_batches: Optional[int] = None
  # Measure the knock-outs (all Engram layers, then each alone).
  knockout: bool = True
  # N-grams reported per Engram layer and order, and how often one must occur to be ranked.
  top_ngrams: int = 10
  min_ngram_count: int = 5
  # Needle-in-a-haystack row lengths in tokens (None = (seq_len // 2, seq_len); () = skip).
  niah_lengths: Optional[Tuple[int, ...]] = None
  # Key -> value needles per haystack (each one is queried), candidate values per query (the
  # needles' values plus random values absent from the text), haystacks per length.
  niah_needles: int = 2
  niah_candidates: int = 4
  niah_examples: int = 8
  # Multiple-choice JSONL files ({"question", "choices", "answer"}), and at most this many
  # questions of each (None = all).
  mc_files: Tuple[str, ...] = ()
  mc_max_questions: Optional[int] = None
  # Seed of the needle haystacks, keys and values.
  seed: int = 0

  def __post_init__(self):
    for field in ("eval_files", "niah_lengths", "mc_files"):
      value = getattr(self, field)
      if isinstance(value, (str, int)):
        value = (value,)
      object.__setattr__(self, field, None if value is None else tuple(value))
    for field in ("max_batches", "mc_max_questions"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"EvalOptions.{field}={value!r}: expected None or a positive integer")
    for field in ("niah_needles", "niah_examples", "top_ngrams", "min_ngram_count"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise ValueError(f"EvalOptions.{field}={getattr(self, field)!r}: expected a positive integer")
    if self.niah_candidates < max(2, self.niah_needles):
      raise ValueError(f"EvalOptions.niah_candidates={self.niah_candidates}: expected at least "
                       f"max(2, niah_needles={self.niah_needles}) (every needle's value is a candidate)")
    if self.niah_candidates > 9000:
      raise ValueError(f"EvalOptions.niah_candidates={self.niah_candidates}: values are 4-digit numbers, "
                       "expected at most 9000")
    if self.niah_lengths is not None and any(not isinstance(n, int) or n < 2 for n in self.niah_lengths):
      raise ValueError(f"EvalOptions.niah_lengths={self.niah_lengths}: expected token counts >= 2")

  def check_files(self):
    """FileNotFoundError naming the first eval or multiple-choice file that does not exist (before
    anything slow happens, such as restoring a checkpoint)."""
    for kind, files in (("eval", self.eval_files or ()), ("multiple-choice", self.mc_files)):
      for path in files:
        if not os.path.isfile(path):
          raise FileNotFoundError(f"{kind} file {path!r} does not exist")
        if _is_blank(path):
          raise ValueError(f"{kind} file {path!r} is empty (or only whitespace): expected text to evaluate on")


def _is_blank(path: str, limit: int = 1 << 24) -> bool:
  """Whether a file holds nothing but whitespace (read up to `limit` bytes; a larger file is text)."""
  if os.path.getsize(path) == 0:
    return True
  if os.path.getsize(path) > limit:
    return False
  with open(path, "rb") as f:
    return not f.read().strip()


# ----------------------------------------------------------------------------------------------
# Metrics.


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
  """Total nats over a text / ln 2 / its UTF-8 byte count."""
  if total_bytes <= 0:
    raise ValueError(f"total_bytes={total_bytes}: expected a positive byte count")
  return float(total_nats) / math.log(2.0) / float(total_bytes)


def loss_metrics(total_nats: float, tokens: int, total_bytes: int) -> Dict[str, float]:
  """{"loss", "perplexity", "bits_per_byte"} of `tokens` predictions totalling `total_nats`."""
  if tokens <= 0:
    raise ValueError(f"tokens={tokens}: expected at least one scored token")
  loss = float(total_nats) / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": bits_per_byte(total_nats, total_bytes)}


def knockout_metrics(full: Dict[str, float], knocked: Dict[str, float]) -> Dict[str, float]:
  """The knocked metrics plus loss_increase (knocked - full) and retained_fraction (full / knocked loss)."""
  return {**knocked, "loss_increase": knocked["loss"] - full["loss"],
          "retained_fraction": full["loss"] / knocked["loss"] if knocked["loss"] > 0 else 1.0}


def retained(full: float, knocked: float) -> Optional[float]:
  """The paper's retained performance, knocked / full (None when full is 0)."""
  return knocked / full if full > 0 else None


@dataclasses.dataclass
class DocumentTotals:
  """Per-document sums of one eval set under one condition."""

  nats: np.ndarray  # float64 [D]
  tokens: np.ndarray  # int64 [D]: predictions scored

  @classmethod
  def zeros(cls, num_documents: int):
    return cls(np.zeros(num_documents), np.zeros(num_documents, np.int64))

  def add(self, nll: np.ndarray, loss_mask: np.ndarray, document_ids: np.ndarray):
    """Adds one batch: nll, loss_mask, document_ids all [B, T] (document id -1 = padding)."""
    keep = (loss_mask > 0) & (document_ids >= 0)
    docs = document_ids[keep]
    n = len(self.nats)
    self.nats += np.bincount(docs, weights=nll[keep].astype(np.float64), minlength=n)[:n]
    self.tokens += np.bincount(docs, minlength=n)[:n]


def set_metrics(totals: DocumentTotals, doc_lengths: np.ndarray, byte_counts: np.ndarray) -> Dict[str, float]:
  """Loss, perplexity and bits per byte over the documents whose every prediction was scored
  (a document of L tokens, <bos> and <eos> included, has L - 1 predictions)."""
  complete = totals.tokens == np.asarray(doc_lengths) - 1
  if not complete.any():
    raise ValueError("no document was scored completely: raise max_batches or use shorter documents")
  out = loss_metrics(float(totals.nats[complete].sum()), int(totals.tokens[complete].sum()),
                     int(np.asarray(byte_counts)[complete].sum()))
  out.update(documents=int(complete.sum()), tokens=int(totals.tokens[complete].sum()),
             bytes=int(np.asarray(byte_counts)[complete].sum()))
  return out


# ----------------------------------------------------------------------------------------------
# Gates.


def gate_summary(gates: np.ndarray) -> Dict[str, object]:
  """mean, std and quantiles of a 1-D array of gate values."""
  gates = np.asarray(gates, np.float64)
  return {"mean": float(gates.mean()), "std": float(gates.std()),
          "quantiles": {k: float(v) for k, v in zip(_QUANTILE_KEYS, np.quantile(gates, QUANTILES))}}


def top_ngrams(tokens: np.ndarray, document_ids: np.ndarray, gates: np.ndarray, n: int, k: int,
               min_count: int) -> List[Dict[str, object]]:
  """The `k` n-grams with the highest mean gate, among those seen at least `min_count` times.

  tokens, document_ids, gates: [N] over the token stream in order (document id -1 = padding). The
  gate at position t belongs to the n-gram of tokens t-n+1..t (the suffix n-gram Engram looked up
  there); n-grams crossing a document boundary are skipped. Returns dicts {"token_ids", "count",
  "mean_gate"}, best first (ties: more frequent first).
  """
  tokens, document_ids, gates = np.asarray(tokens), np.asarray(document_ids), np.asarray(gates, np.float64)
  N = len(tokens)
  if N < n:
    return []
  ends = np.arange(n - 1, N)
  windows = np.stack([tokens[ends - (n - 1) + j] for j in range(n)], axis=-1)  # [W, n]
  same_doc = np.all(np.stack([document_ids[ends - j] == document_ids[ends] for j in range(n)]), axis=0)
  valid = same_doc & (document_ids[ends] >= 0)
  windows, ends = windows[valid], ends[valid]
  if not len(windows):
    return []
  unique, inverse = np.unique(windows, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  counts = np.bincount(inverse, minlength=len(unique))
  means = np.bincount(inverse, weights=gates[ends], minlength=len(unique)) / np.maximum(counts, 1)
  ok = np.flatnonzero(counts >= min_count)
  order = ok[np.lexsort((-counts[ok], -means[ok]))][:k]
  return [{"token_ids": [int(t) for t in unique[i]], "count": int(counts[i]), "mean_gate": float(means[i])}
          for i in order]


# ----------------------------------------------------------------------------------------------
# The whole evaluation.


def _set_config(cfg: Config, files: Optional[Tuple[str, ...]]):
  return cfg.data if files is None else dataclasses.replace(cfg.data, eval_files=tuple(files))


def benchmark_sets(cfg: Config, options: EvalOptions) -> List[Tuple[str, Tuple[str, ...]]]:
  """(name, files) of each benchmark set: one per --eval_files entry, else the config's eval split."""
  if options.eval_files:
    names, out = set(), []
    for path in options.eval_files:
      name = os.path.splitext(os.path.basename(path))[0]
      while name in names:
        name += "_"
      names.add(name)
      out.append((name, (path,)))
    return out
  files = data_lib.split_files(cfg.data, "eval")
  if cfg.data.eval_files is None and cfg.data.train_files is None:
    return [("heldout", files)]
  return [(os.path.splitext(os.path.basename(files[0]))[0] if len(files) == 1 else "eval", files)]


def knockout_conditions(layers: Sequence[int]) -> List[Tuple[str, Tuple[int, ...]]]:
  """(name, Engram layers switched off): "all" first, then "layer_<id>" for each layer."""
  if not layers:
    return []
  return [("all", tuple(layers))] + [(f"layer_{l}", (l,)) for l in layers]


def _evaluate_set(runner: ModelRunner, name: str, files, options: EvalOptions, collect_gates: bool):
  cfg = runner.cfg
  data_cfg = _set_config(cfg, files)
  batches = data_lib.eval_batches(data_cfg, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size,
                                  tokenizer=runner.tokenizer)
  if options.max_batches is not None:
    batches = batches[:options.max_batches]
  corpus = data_lib.tokenized_split(data_cfg, "eval", runner.tokenizer)
  byte_counts = corpus.byte_counts
  conditions = [("full", ())] + (knockout_conditions(runner.engram_layers) if options.knockout else [])
  # Knocking out the only Engram layer is the same as knocking out all: compute each scale once.
  scales = {off: runner.scale(off) for _, off in conditions}
  totals = {off: DocumentTotals.zeros(corpus.num_documents) for off in scales}
  stream = {"tokens": [], "document_ids": [], "gates": []}
  # Batch i+1's host work (Engram rows from host tables, placement) overlaps batch i's forwards.
  for local, prepared in runner.prepared(batches):
    glob = {k: gather_global(local[k]) for k in ("loss_mask", "document_ids", "tokens", "segment_ids")}
    for off, scale in scales.items():
      out = runner.forward(prepared, scale)
      totals[off].add(out["nll"], glob["loss_mask"], glob["document_ids"])
      if off == () and collect_gates and runner.engram_layers:
        stream["tokens"].append(glob["tokens"].reshape(-1))
        stream["document_ids"].append(np.where(glob["segment_ids"] > 0, glob["document_ids"], -1).reshape(-1))
        stream["gates"].append(out["gates"].reshape((-1,) + out["gates"].shape[2:]))
  full = set_metrics(totals[()], corpus.doc_lengths, byte_counts)
  record = {"name": name, "files": [os.path.basename(f) for f in files], **full, "knockout": []}
  for cond, off in conditions[1:]:
    knocked = set_metrics(totals[off], corpus.doc_lengths, byte_counts)
    record["knockout"].append({"condition": cond, "layers_off": list(off),
                               **knockout_metrics(full, {k: knocked[k] for k in ("loss", "perplexity",
                                                                                   "bits_per_byte")})})
  gates = None
  if stream["gates"]:
    gates = {k: np.concatenate(v) for k, v in stream.items()}
  return record, gates


def _gate_records(runner: ModelRunner, stream, options: EvalOptions) -> List[dict]:
  keep = stream["document_ids"] >= 0
  records = []
  max_n = runner.cfg.model.engram.max_ngram_size
  for i, layer in enumerate(runner.engram_layers):
    g = stream["gates"][:, i]  # [N, M]
    branches = [{"branch": m, **gate_summary(g[keep, m])} for m in range(g.shape[1])]
    mean_gate = g.mean(axis=1)  # rank n-grams by the gate averaged over branches
    ngrams = []
    for n in range(2, max_n + 1):
      for item in top_ngrams(stream["tokens"], stream["document_ids"], mean_gate, n, options.top_ngrams,
                             options.min_ngram_count):
        text = runner.tokenizer.decode(item["token_ids"], skip_special_tokens=False)
        ngrams.append({"n": n, "text": text, **item})
    records.append({"layer": layer, **gate_summary(g[keep].mean(axis=1)), "branches": branches,
                    "top_ngrams": ngrams})
  return records


def default_niah_lengths(cfg: Config) -> Tuple[int, ...]:
  return tuple(sorted({cfg.data.seq_len // 2, cfg.data.seq_len}))


def haystack_tokens(runner: ModelRunner, files) -> np.ndarray:
  """Token ids of held-out text with <bos>/<eos>/<pad> removed (needles go between real tokens)."""
  corpus = data_lib.tokenized_split(_set_config(runner.cfg, files), "eval", runner.tokenizer)
  special = [t for t in (runner.bos_id, runner.pad_id,
                         runner.tokenizer.token_to_id(runner.cfg.data.eos_token)) if t is not None]
  return corpus.tokens[~np.isin(corpus.tokens, special)]


def run_evaluation(runner: ModelRunner, options: EvalOptions = EvalOptions(), *, step: Optional[int] = None,
                   checkpoint_dir: Optional[str] = None, gate_text: Optional[str] = None,
                   out_dir: Optional[str] = None, log: Callable[[str], None] = lambda s: None) -> dict:
  """Every measurement of `options` on the runner's model; returns the results.json dict (and, with
  `gate_text` and `out_dir`, writes out_dir/gates.png and gates.html)."""
  options.check_files()
  cfg = runner.cfg
  counts = param_counts(cfg.model)
  engram = cfg.model.engram
  results = {
      "schema_version": SCHEMA_VERSION,
      "checkpoint": {"directory": checkpoint_dir, "step": step,
                     "patches": [os.path.abspath(p) for p in runner.patches]},
      "model": {"preset": cfg.name, "engram_layers": list(runner.engram_layers), "mhc_branches": runner.branches,
                "max_ngram_size": engram.max_ngram_size if engram is not None else None,
                "params": {k: int(v) for k, v in counts.items()}},
      "benchmarks": [], "gates": [], "niah": None, "multiple_choice": [], "gate_visualization": None,
  }
  sets = benchmark_sets(cfg, options)
  runner.hit_counter.reset()  # hot-row cache hit rates over the benchmark sets only
  for i, (name, files) in enumerate(sets):
    log(f"benchmark {name}: {', '.join(files)}")
    record, stream = _evaluate_set(runner, name, files, options, collect_gates=i == 0)
    results["benchmarks"].append(record)
    if stream is not None:
      results["gates"] = _gate_records(runner, stream, options)
  results["engram_tables"] = runner.table_report()

  off_all = runner.scale(runner.engram_layers)
  lengths = default_niah_lengths(cfg) if options.niah_lengths is None else options.niah_lengths
  if lengths:
    log(f"needle in a haystack at lengths {list(lengths)}")
    queries = make_niah_queries(haystack_tokens(runner, sets[0][1]), runner.encode, lengths,
                                num_needles=options.niah_needles, num_candidates=options.niah_candidates,
                                num_examples=options.niah_examples, seed=options.seed, bos_id=runner.bos_id)
    full = score_niah(queries, runner.score_fn())
    knocked = score_niah(queries, runner.score_fn(off_all)) if runner.engram_layers and options.knockout else None
    per_length = []
    for j, rec in enumerate(full):
      k = knocked[j] if knocked else None
      per_length.append({**rec, "no_engram_accuracy": k and k["accuracy"],
                         "no_engram_greedy_accuracy": k and k["greedy_accuracy"],
                         "retained_fraction": k and retained(rec["accuracy"], k["accuracy"])})
    results["niah"] = {"needles": options.niah_needles, "candidates": options.niah_candidates,
                       "examples_per_length": options.niah_examples, "lengths": per_length}

  for path in options.mc_files:
    log(f"multiple choice: {path}")
    probes = read_mc_file(path)[:options.mc_max_questions]
    full = score_multiple_choice(probes, runner.encode, runner.score_fn(), runner.bos_id)
    full.pop("greedy_exact")  # results.json keeps its schema (knowledge patches report it)
    record = {"name": os.path.splitext(os.path.basename(path))[0], "file": os.path.basename(path), **full,
              "no_engram_accuracy": None, "no_engram_accuracy_norm": None, "retained_fraction": None}
    if runner.engram_layers and options.knockout:
      knocked = score_multiple_choice(probes, runner.encode, runner.score_fn(off_all), runner.bos_id)
      record.update(no_engram_accuracy=knocked["accuracy"], no_engram_accuracy_norm=knocked["accuracy_norm"],
                    retained_fraction=retained(full["accuracy"], knocked["accuracy"]))
    results["multiple_choice"].append(record)

  if gate_text and out_dir and runner.engram_layers:
    from engram_jax.visualize import save_gate_visualization

    pieces, gates = runner.gate_trace(gate_text)  # every process runs the forward; one writes
    prefix = os.path.join(out_dir, "gates")
    results["gate_visualization"] = {"text": gate_text, "png": "gates.png", "html": "gates.html"}
    if jax.process_index() == 0:
      results["gate_visualization"] = save_gate_visualization(
          pieces, gates, runner.engram_layers, prefix, title=f"{cfg.name} step {step}", text=gate_text)
  return results


# ----------------------------------------------------------------------------------------------
# Schema, table, files.


def results_schema(results) -> List[str]:
  """Sorted key paths of a results dict: "a.b" for nested dicts, "a[].b" inside lists of records.
  tests/golden/eval_results_keys.json holds the expected list, so a renamed or added key shows up
  in review (update the golden file and the README's Evaluation section together)."""
  paths = set()

  def walk(node, prefix):
    if isinstance(node, dict):
      for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        paths.add(path)
        walk(value, path)
    elif isinstance(node, list):
      for item in node:
        walk(item, prefix + "[]")

  walk(results, "")
  return sorted(paths)


def _f(x, fmt="{:.4f}"):
  return "-" if x is None else fmt.format(x)


def format_table(results: dict) -> str:
  """The human-readable summary eval.py prints."""
  lines = []
  ck = results["checkpoint"]
  lines.append(f"Model {results['model']['preset']}  step {ck['step']}  Engram layers {results['model']['engram_layers']}")
  if ck.get("patches"):
    lines.append("Knowledge patches: " + ", ".join(ck["patches"]))
  lines.append("")
  lines.append(f"{'benchmark':<18}{'condition':<14}{'loss':>9}{'ppl':>11}{'bpb':>8}{'d_loss':>9}{'retained':>10}")
  for b in results["benchmarks"]:
    lines.append(f"{b['name']:<18}{'full':<14}{b['loss']:>9.4f}{b['perplexity']:>11.2f}{b['bits_per_byte']:>8.4f}"
                 f"{'':>9}{'':>10}")
    for k in b["knockout"]:
      lines.append(f"{'':<18}{'off ' + k['condition']:<14}{k['loss']:>9.4f}{k['perplexity']:>11.2f}"
                   f"{k['bits_per_byte']:>8.4f}{k['loss_increase']:>+9.4f}{k['retained_fraction']:>10.3f}")
    lines.append(f"{'':<18}({b['documents']} documents, {b['tokens']} tokens, {b['bytes']} bytes)")
  for g in results["gates"]:
    lines.append("")
    q = g["quantiles"]
    lines.append(f"Engram layer {g['layer']} gate: mean {g['mean']:.3f} (p05 {q['p05']:.3f}, p50 {q['p50']:.3f}, "
                 f"p95 {q['p95']:.3f}); per branch: " + ", ".join(f"{b['mean']:.3f}" for b in g["branches"]))
    shown: Dict[int, int] = {}
    for item in g["top_ngrams"]:
      shown[item["n"]] = shown.get(item["n"], 0) + 1
      if shown[item["n"]] > 5:
        continue
      lines.append(f"    n={item['n']}  gate {item['mean_gate']:.3f}  x{item['count']:<5} {item['text']!r}")
  tables = results.get("engram_tables")
  if tables and tables["placement"] != "device":
    lines.append("")
    lines.append(f"Engram tables on {tables['placement']} ({tables['quantize']}, {tables['bytes_per_row']} bytes per row)")
    if tables["cache"]:
      lines.append(f"hot-row cache of {tables['cache']['rows_per_table']} rows per table, hit rates:")
      for layer in tables["cache"]["layers"]:
        lines.append(f"    layer {layer['layer']}: {_f(layer['hit_rate'], '{:.3f}')}  by order: " + ", ".join(
            f"n={o['n']} {_f(o['hit_rate'], '{:.3f}')}" for o in layer["orders"]))
  if results["niah"]:
    lines.append("")
    lines.append(f"Needle in a haystack ({results['niah']['needles']} needles, {results['niah']['candidates']} "
                 "candidates per query)")
    lines.append(f"{'length':>8}{'queries':>9}{'accuracy':>10}{'greedy':>8}{'no Engram':>11}{'retained':>10}")
    for r in results["niah"]["lengths"]:
      lines.append(f"{r['length']:>8}{r['queries']:>9}{r['accuracy']:>10.3f}{r['greedy_accuracy']:>8.3f}"
                   f"{_f(r['no_engram_accuracy'], '{:.3f}'):>11}{_f(r['retained_fraction'], '{:.3f}'):>10}")
  if results["multiple_choice"]:
    lines.append("")
    lines.append(f"{'multiple choice':<22}{'questions':>10}{'acc':>8}{'acc_norm':>10}{'no Engram':>11}{'retained':>10}")
    for r in results["multiple_choice"]:
      lines.append(f"{r['name']:<22}{r['questions']:>10}{r['accuracy']:>8.3f}{r['accuracy_norm']:>10.3f}"
                   f"{_f(r['no_engram_accuracy'], '{:.3f}'):>11}{_f(r['retained_fraction'], '{:.3f}'):>10}")
  viz = results.get("gate_visualization")
  if viz:
    lines.append("")
    lines.append(f"Gate visualisation: {viz['png']}  {viz['html']}")
  return "\n".join(lines)


def write_results(results: dict, out_dir: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "results.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, ensure_ascii=False)
    f.write("\n")
  return path


def evaluate_checkpoint(cfg: Config, checkpoint_dir: str, options: EvalOptions = EvalOptions(), *,
                        step: Optional[int] = None, mesh=None, out_dir: Optional[str] = None,
                        gate_text: Optional[str] = None, patches: Sequence[str] = (), patch_policy: str = "sum",
                        force_patches: bool = False, log: Callable[[str], None] = print,
                        **tables) -> dict:
  """Restores `checkpoint_dir` onto `mesh` (default: every device), applies knowledge `patches` (if
  any), evaluates, and writes `out_dir/results.json` (plus the gate visualisation of `gate_text`)
  when out_dir is given. `tables`: where the Engram tables live (ModelRunner.from_checkpoint's
  engram_tables, table_dir, cache_rows, quantize, verify_tables, prefetch)."""
  options.check_files()
  if patches:
    from engram_jax import patches as patches_lib

    if cfg.model.engram is None:
      raise patches_lib.PatchError("knowledge patches change Engram table rows, and this model has no Engram layers")
    hashing = data_lib.engram_hashing(data_lib.load_tokenizer(cfg.data.tokenizer_path), cfg.model.engram)
    for path in patches:  # a missing, damaged or other model's patch fails before the (slow) restore
      patches_lib.check_model(patches_lib.load_patch(path), cfg.model, hashing, path)
  if patches and tables.get("engram_tables", "device") != "device":
    raise ValueError(f"knowledge patches change table rows on the device: they need engram_tables='device', not "
                     f"{tables['engram_tables']!r}")
  runner = ModelRunner.from_checkpoint(cfg, checkpoint_dir, step=step, mesh=mesh, log=log, **tables)
  if patches:
    runner.apply_patches(patches, policy=patch_policy, force=force_patches, log=log)
  results = run_evaluation(runner, options, step=runner.step, checkpoint_dir=os.path.abspath(checkpoint_dir),
                           gate_text=gate_text, out_dir=out_dir, log=log)
  if out_dir and jax.process_index() == 0:
    write_results(results, out_dir)
  return results
