"""A synthetic knowledge corpus: invented people with attributes, stated in varied sentences.

Why synthetic: the paper's claim is that Engram stores factual, local knowledge (its knockout
ablation loses most of TriviaQA-style recall). Real trivia needs a big model and a big corpus; with
invented entities the facts are known exactly, no model has seen them before, and a tiny model on a
CPU can learn them, so storage and knockout experiments run in minutes. Names are made of invented
syllables so that they span several tokens (an n-gram memory has something to key on) and cannot
collide with anything in the embedded corpus.

Every fact is stated in several phrasings (sentence templates); the first biography of an entity
uses each attribute's canonical template, so the probe prompt (that template's prefix) followed by
the answer occurs verbatim in the training text. Held-out documents use templates never used in
training, for measuring whether a fact was stored rather than a sentence memorised.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Sequence

import numpy as np

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
           "th", "sh", "st", "gl", "tr", "qu", "h")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk")
_CITY_SUFFIXES = ("ford", "heim", "ova", "bury", "stad", "polis", "mere", "gard", "wick", "ton")

# With their article, so that every template reads correctly ("an architect", "a baker").
OCCUPATIONS = tuple(("an " if w[0] in "aeiou" else "a ") + w for w in (
    "architect", "astronomer", "baker", "cartographer", "chemist", "composer", "diplomat",
    "engineer", "geologist", "glassblower", "historian", "jeweller", "librarian", "linguist",
    "mathematician", "midwife", "painter", "pharmacist", "physician", "poet", "sailor", "sculptor",
    "surveyor", "weaver"))
INSTRUMENTS = ("cello", "clarinet", "flute", "guitar", "harp", "harpsichord", "lute", "oboe",
               "organ", "piano", "trumpet", "viola", "violin", "zither")
YEARS = tuple(str(y) for y in range(1650, 2000))

ATTRIBUTES = ("birthplace", "occupation", "birth_year", "instrument")

# Per attribute: the canonical template first (the probe prompt is its prefix before "{value}"),
# then more training phrasings; the last one is reserved for held-out documents.
TEMPLATES: Dict[str, Sequence[str]] = {
    "birthplace": (
        "{name} was born in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} grew up in {value}, the town of their birth.",
        "Records show that {name} came into the world in {value}.",
        "{value} is where {name} was born.",
    ),
    "occupation": (
        "{name} worked as {value}.",
        "By profession, {name} was {value}.",
        "{name} earned a living as {value}.",
        "Most people knew {name} as {value}.",
        "The trade of {name} was that of {value}.",
    ),
    "birth_year": (
        "{name} was born in the year {value}.",
        "The year {name} was born was {value}.",
        "{name} entered the world in {value}.",
        "According to the registry, {name} was born in {value}.",
        "In {value}, {name} was born.",
    ),
    "instrument": (
        "{name} played the {value}.",
        "The instrument of {name} was the {value}.",
        "In the evenings, {name} practised the {value}.",
        "{name} was known for playing the {value}.",
        "Friends remember {name} at the {value}.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Entity:
  name: str
  attributes: Dict[str, str]


@dataclasses.dataclass
class KnowledgeCorpus:
  entities: List[Entity]
  # Biographies stated with the training templates (canonical phrasing first).
  train_documents: List[str]
  # One biography per entity stated with the held-out templates only.
  eval_documents: List[str]
  # Multiple-choice probes: {"question", "choices", "answer" (index into choices), "entity",
  # "attribute"}; score each choice as the continuation `question + " " + choice`.
  probes: List[dict]
  # The index into `entities` of each training document's entity.
  train_entities: List[int] = dataclasses.field(default_factory=list)


def _word(rng: np.random.Generator, syllables: int) -> str:
  parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
           + _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables)]
  return "".join(parts).capitalize()


def _unique(rng, make, count: int, taken: set) -> List[str]:
  out = []
  while len(out) < count:
    value = make(rng)
    if value not in taken:
      taken.add(value)
      out.append(value)
  return out


def probe_prompt(attribute: str, name: str) -> str:
  """The cloze prompt of an attribute: its canonical template up to the value."""
  template = TEMPLATES[attribute][0]
  return template[:template.index("{value}")].format(name=name).rstrip()


def generate_knowledge(num_entities: int = 256, *, seed: int = 0, documents_per_entity: int = 3,
                       num_choices: int = 4, num_cities: int = 48) -> KnowledgeCorpus:
  """Deterministic in its arguments (numpy generator seeded with `seed`)."""
  if num_entities < 1 or documents_per_entity < 1:
    raise ValueError(f"num_entities={num_entities}, documents_per_entity={documents_per_entity}: "
                     "expected positive integers")
  pools = {"birthplace": None, "occupation": OCCUPATIONS, "birth_year": YEARS, "instrument": INSTRUMENTS}
  smallest = min(num_cities, *(len(p) for p in pools.values() if p is not None))
  if not 2 <= num_choices <= smallest:
    raise ValueError(f"num_choices={num_choices}: expected 2..{smallest} (the smallest attribute pool)")
  rng = np.random.default_rng(seed)
  taken: set = set()
  pools["birthplace"] = tuple(_unique(
      rng, lambda r: _word(r, int(r.integers(1, 3))) + _CITY_SUFFIXES[r.integers(len(_CITY_SUFFIXES))],
      num_cities, taken))
  names = _unique(rng, lambda r: _word(r, 2) + " " + _word(r, int(r.integers(2, 4))), num_entities, taken)
  entities = [Entity(name, {a: pools[a][rng.integers(len(pools[a]))] for a in ATTRIBUTES}) for name in names]

  train_docs, train_owner, eval_docs, probes = [], [], [], []
  for index, entity in enumerate(entities):
    for d in range(documents_per_entity):
      order = rng.permutation(len(ATTRIBUTES)) if d else np.arange(len(ATTRIBUTES))
      sentences = []
      for a in (ATTRIBUTES[i] for i in order):
        choices = TEMPLATES[a][:-1]
        template = choices[0] if d == 0 else choices[rng.integers(len(choices))]
        sentences.append(template.format(name=entity.name, value=entity.attributes[a]))
      train_docs.append(" ".join(sentences))
      train_owner.append(index)
    eval_docs.append(" ".join(TEMPLATES[a][-1].format(name=entity.name, value=entity.attributes[a])
                              for a in ATTRIBUTES))
    for a in ATTRIBUTES:
      answer = entity.attributes[a]
      others = [v for v in pools[a] if v != answer]
      picks = [others[i] for i in rng.choice(len(others), num_choices - 1, replace=False)]
      slot = int(rng.integers(num_choices))
      choices = picks[:slot] + [answer] + picks[slot:]
      probes.append(dict(question=probe_prompt(a, entity.name), choices=choices, answer=slot,
                         entity=entity.name, attribute=a))
  order = rng.permutation(len(train_docs))
  return KnowledgeCorpus(entities, [train_docs[i] for i in order], eval_docs, probes,
                         [train_owner[i] for i in order])


def split_entities(corpus: KnowledgeCorpus, parts: int) -> List[KnowledgeCorpus]:
  """The corpus as `parts` corpora of disjoint entities (entity i in part i % parts), each with its
  own documents and probes, for training facts at different frequencies and scoring them apart. The
  attribute pools stay shared, so every part's probes draw their wrong choices from the same values."""
  if not 1 <= parts <= len(corpus.entities):
    raise ValueError(f"parts={parts}: expected 1..{len(corpus.entities)} (the corpus's entities)")
  if len(corpus.train_entities) != len(corpus.train_documents):
    raise ValueError("the corpus has no document owners (train_entities); generate it with generate_knowledge")
  index = {e.name: i for i, e in enumerate(corpus.entities)}
  out = []
  for part in range(parts):
    keep = [i for i in range(len(corpus.entities)) if i % parts == part]
    out.append(KnowledgeCorpus(
        [corpus.entities[i] for i in keep],
        [d for d, i in zip(corpus.train_documents, corpus.train_entities) if i % parts == part],
        [corpus.eval_documents[i] for i in keep],
        [p for p in corpus.probes if index[p["entity"]] % parts == part],
        [keep.index(i) for i in corpus.train_entities if i % parts == part]))
  return out


def qa_pairs(corpus: KnowledgeCorpus) -> List[dict]:
  """The training statements as {"prompt", "answer"} pairs: every entity's attributes stated with
  every training template, cut before the value (the prompt) and ending at it (the answer), in the
  format `patch.py create --qa` trains on with the loss on the answers only."""
  pairs = []
  for entity in corpus.entities:
    for a in ATTRIBUTES:
      for template in TEMPLATES[a][:-1]:
        prompt = template[:template.index("{value}")].format(name=entity.name).rstrip()
        pairs.append({"prompt": prompt, "answer": entity.attributes[a]})
  return pairs


def write_knowledge(corpus: KnowledgeCorpus, out_dir: str) -> Dict[str, str]:
  """Writes train.txt / heldout.txt (form-feed separated, as `engram_jax.data` reads text),
  probes.jsonl and qa.jsonl (`qa_pairs`); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f) for k, f in
           (("train", "train.txt"), ("eval", "heldout.txt"), ("probes", "probes.jsonl"), ("qa", "qa.jsonl"))}
  for key, docs in (("train", corpus.train_documents), ("eval", corpus.eval_documents)):
    with open(paths[key], "w", encoding="utf-8", newline="\n") as f:
      f.write("\n\f\n".join(docs) + "\n")
  with open(paths["probes"], "w", encoding="utf-8", newline="\n") as f:
    for probe in corpus.probes:
      f.write(json.dumps(probe) + "\n")
  with open(paths["qa"], "w", encoding="utf-8", newline="\n") as f:
    for pair in qa_pairs(corpus):
      f.write(json.dumps(pair) + "\n")
  return paths


# Question forms that never occur in the training text (no template ends this way), for measuring
# whether a fact was stored or only its sentences: the prompt differs, the answer is the same.
PARAPHRASE_PROMPTS: Dict[str, str] = {
    "birthplace": "Asked where they were born, {name} named",
    "occupation": "Asked about their work, {name} said they were",
    "birth_year": "Asked when they were born, {name} gave the year",
    "instrument": "Asked about music, {name} said they played the",
}


def paraphrase_probes(probes: Sequence[dict]) -> List[dict]:
  """The same multiple-choice probes asked with `PARAPHRASE_PROMPTS` instead of the canonical prefix."""
  return [dict(p, question=PARAPHRASE_PROMPTS[p["attribute"]].format(name=p["entity"])) for p in probes]
