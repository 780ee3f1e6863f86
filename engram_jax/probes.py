"""Probes that score a model through a `ScoreFn` (runner.ModelRunner.score_fn): a multi-query
needle-in-a-haystack test and multiple-choice questions (the knowledge probes of knowledge.py are
multiple-choice files too). Each returns accuracies; evaluation.py runs them with Engram on and
knocked out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engram_jax import data as data_lib
from engram_jax.runner import ScoreFn


# ----------------------------------------------------------------------------------------------
# Needle in a haystack.


@dataclasses.dataclass
class NiahQuery:
  """One query of one haystack: the prompt, the candidate values (token ids) and the true one."""

  length: int  # the requested row length (context + longest candidate)
  context: List[int]
  candidates: List[List[int]]
  answer: int
  key: str = ""
  values: Tuple[str, ...] = ()


_SYLLABLES = tuple(a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou"))


def _invented_word(rng: np.random.Generator) -> str:
  return "".join(_SYLLABLES[rng.integers(len(_SYLLABLES))] for _ in range(3))


def needle_text(key: str, value: str) -> str:
  return f" The magic number for {key} is {value}."


def query_text(key: str) -> str:
  return f" The magic number for {key} is"


def make_niah_queries(haystack: np.ndarray, encode: Callable[[str], List[int]], lengths: Sequence[int], *,
                      num_needles: int = 2, num_candidates: int = 4, num_examples: int = 8, seed: int = 0,
                      bos_id: Optional[int] = None) -> List[NiahQuery]:
  """Multi-query needle-in-a-haystack prompts (RULER's MQ-NIAH, scored by likelihood).

  Per example: `num_needles` sentences " The magic number for <key> is <value>." (invented keys,
  distinct 4-digit values) inserted at random token positions of a slice of `haystack` (token ids
  of real text), then one query per needle: the shared context followed by " The magic number for
  <key> is". Candidates are " <value>" for every needle's value plus random values absent from the
  context, in random order. The haystack slice is as long as fits, so context + the longest
  candidate is exactly `length` tokens.
  """
  rng = np.random.default_rng(seed)
  haystack = np.asarray(haystack)
  queries: List[NiahQuery] = []
  for length in lengths:
    for _ in range(num_examples):
      keys: List[str] = []
      while len(keys) < num_needles:
        word = _invented_word(rng)
        if word not in keys:
          keys.append(word)
      values = [str(v) for v in rng.choice(np.arange(1000, 10000), num_candidates, replace=False)]
      needles = [encode(needle_text(k, v)) for k, v in zip(keys, values)]
      query_tokens = [encode(query_text(k)) for k in keys]
      candidate_tokens = [encode(" " + v) for v in values]
      fixed = (bos_id is not None) + sum(map(len, needles)) + max(map(len, query_tokens)) + max(
          map(len, candidate_tokens))
      budget = length - fixed
      if budget < 0:
        raise ValueError(f"niah length {length}: {num_needles} needles, a query and a value take {fixed} tokens; "
                         f"expected a length of at least {fixed} (or fewer needles)")
      if budget > len(haystack):
        raise ValueError(f"niah length {length} needs {budget} haystack tokens but the held-out text has "
                         f"{len(haystack)}")
      start = int(rng.integers(0, len(haystack) - budget + 1))
      hay = [int(t) for t in haystack[start:start + budget]]
      cuts = np.sort(rng.integers(0, budget + 1, num_needles))
      order = rng.permutation(num_needles)  # needles appear in random order
      body: List[int] = [] if bos_id is None else [bos_id]
      last = 0
      for cut, j in zip(cuts, order):
        body += hay[last:cut] + needles[j]
        last = int(cut)
      body += hay[last:]
      for j, key in enumerate(keys):
        # The longest query must still leave room for the longest candidate: pad shorter queries'
        # rows with nothing; every row is at most `length` tokens.
        perm = [int(p) for p in rng.permutation(num_candidates)]
        queries.append(NiahQuery(length=int(length), context=body + query_tokens[j],
                                 candidates=[candidate_tokens[p] for p in perm], answer=perm.index(j),
                                 key=key, values=tuple(values[p] for p in perm)))
  return queries


def score_niah(queries: Sequence[NiahQuery], score_fn: ScoreFn) -> List[Dict[str, float]]:
  """Per length: accuracy (the true value has the highest log-likelihood among the candidates;
  ties go to the earlier candidate), greedy_accuracy (greedy decoding after the query produces the
  true value exactly), and mean_answer_logprob (log-likelihood of the true value, nats)."""
  contexts, continuations, owner = [], [], []
  for q, query in enumerate(queries):
    for cand in query.candidates:
      contexts.append(query.context)
      continuations.append(cand)
      owner.append(q)
  logprob, greedy = score_fn(contexts, continuations)
  logprob, greedy, owner = np.asarray(logprob, np.float64), np.asarray(greedy, bool), np.asarray(owner)
  per_length: Dict[int, List[Tuple[bool, bool, float]]] = {}
  for q, query in enumerate(queries):
    idx = np.flatnonzero(owner == q)
    lp = logprob[idx]
    per_length.setdefault(query.length, []).append(
        (int(np.argmax(lp)) == query.answer, bool(greedy[idx[query.answer]]), float(lp[query.answer])))
  out = []
  for length in sorted(per_length):
    rows = per_length[length]
    out.append({"length": length, "queries": len(rows), "accuracy": float(np.mean([r[0] for r in rows])),
                "greedy_accuracy": float(np.mean([r[1] for r in rows])),
                "mean_answer_logprob": float(np.mean([r[2] for r in rows]))})
  return out


# ----------------------------------------------------------------------------------------------
# Multiple choice.


def read_mc_file(path: str) -> List[dict]:
  """Probes of a JSONL file: one {"question", "choices", "answer" (index)} object per line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"multiple-choice file {path!r} does not exist (expected JSONL with question, "
                            "choices, answer)")
  valid = lambda p: (isinstance(p, dict) and isinstance(p.get("question"), str)  # noqa: E731
                     and isinstance(p.get("choices"), list) and len(p["choices"]) >= 2
                     and all(isinstance(c, str) and c for c in p["choices"])
                     and isinstance(p.get("answer"), int) and 0 <= p["answer"] < len(p["choices"]))
  return data_lib.read_records(path, valid, '{"question": str, "choices": [>= 2 non-empty str], "answer": index '
                               'into choices}', "multiple-choice")


def score_multiple_choice(probes: Sequence[dict], encode: Callable[[str], List[int]], score_fn: ScoreFn,
                          bos_id: Optional[int] = None) -> Dict[str, float]:
  """accuracy: the answer's continuation " <choice>" after the question has the highest summed
  log-likelihood; accuracy_norm: the highest log-likelihood per UTF-8 byte of " <choice>" (longer
  choices are not penalised for their length); greedy_exact: greedy decoding after the question
  produces the answer's continuation exactly. Ties go to the earlier choice."""
  contexts, continuations, owner, nbytes = [], [], [], []
  for q, p in enumerate(probes):
    context = ([] if bos_id is None else [bos_id]) + encode(p["question"])
    for choice in p["choices"]:
      contexts.append(context)
      continuations.append(encode(" " + choice))
      owner.append(q)
      nbytes.append(len((" " + choice).encode("utf-8")))
  logprob, greedy = score_fn(contexts, continuations)
  logprob, owner, nbytes = np.asarray(logprob, np.float64), np.asarray(owner), np.asarray(nbytes)
  greedy = np.asarray(greedy, bool)
  correct, correct_norm, exact = [], [], []
  for q, p in enumerate(probes):
    idx = np.flatnonzero(owner == q)
    correct.append(int(np.argmax(logprob[idx])) == p["answer"])
    correct_norm.append(int(np.argmax(logprob[idx] / nbytes[idx])) == p["answer"])
    exact.append(bool(greedy[idx[p["answer"]]]))
  return {"questions": len(probes), "accuracy": float(np.mean(correct)), "accuracy_norm": float(np.mean(correct_norm)),
          "greedy_exact": float(np.mean(exact))}
