"""Compiled programs across calls: JAX's persistent compilation cache for the command-line tools, and
counts of what this process compiled and what it read back from that cache.

Every call of train.py, eval.py, generate.py or patch.py traces and compiles the same programs for the
same model; compiling is most of a short call's wall time (about 10 s of generate.py's 16-23 s for the
tiny model). The tools therefore keep JAX's persistent cache in a user-level directory
(`default_cache_dir`: `$ENGRAM_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/engram_jax/xla`, else
`~/.cache/engram_jax/xla`), so a second identical call reads its executables instead of compiling
them. The cache is bounded (`MAX_CACHE_BYTES`, least recently used entries evicted), which is also
what makes it safe to share: with a size bound JAX takes a file lock around every read and write,
so concurrent runs never read an entry another one is half-way through writing (unbounded, JAX
writes entries in place without a lock).

`CompileStats` counts, from JAX's monitoring events, the programs compiled, the executables read from
the cache and the seconds spent tracing, lowering and compiling: generate.py reports decode speed
without compilation, and the tests count cache hits rather than time them.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

MAX_CACHE_BYTES = 4 << 30  # enough for every tiny/small program many times over; LRU beyond it
MIN_COMPILE_SECONDS = 0.0  # every program: a restore-and-generate call compiles several small ones

_HITS = "/jax/compilation_cache/cache_hits"
_COMPILE_OR_READ = "/jax/core/compile/backend_compile_duration"  # around a compile or a cache read
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def default_cache_dir() -> str:
  if os.environ.get("ENGRAM_JAX_CACHE_DIR"):
    return os.environ["ENGRAM_JAX_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "engram_jax", "xla")


def use_persistent_cache(setting: Optional[str]) -> Optional[str]:
  """Turns JAX's persistent compilation cache on for this process; returns its directory (None: off).

  `setting`: None for the default (`JAX_COMPILATION_CACHE_DIR` when the environment sets one, else
  `default_cache_dir()`), "off" to compile everything afresh, or a directory. Call before anything
  compiles."""
  import jax

  if setting is not None and setting.strip().lower() == "off":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  directory = setting or jax.config.jax_compilation_cache_dir or default_cache_dir()
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise OSError(f"--compilation_cache={directory}: cannot create the compilation cache directory ({e.strerror}); "
                  "pass another directory, or --compilation_cache=off") from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


class CompileStats:
  """What this process compiled since the stats were created (one set of listeners per process).

  `programs`: executables this process needed; `cached`: those read from the persistent cache
  (`compiled` is the rest); `seconds`: time spent tracing, lowering and compiling or reading them
  (a cache hit still traces and lowers, so it is not zero)."""

  _lock = threading.Lock()
  _instance: Optional["CompileStats"] = None

  def __init__(self):
    self.programs = 0
    self.cached = 0
    self.seconds = 0.0

  @classmethod
  def get(cls) -> "CompileStats":
    """The process's stats, listening from the first call on."""
    with cls._lock:
      if cls._instance is None:
        import jax

        stats = cls()

        def on_event(event, **_):
          if event == _HITS:
            stats.cached += 1

        def on_duration(event, seconds, **_):
          if event in _COMPILE_EVENTS:
            stats.seconds += seconds
          if event == _COMPILE_OR_READ:
            stats.programs += 1

        jax.monitoring.register_event_listener(on_event)
        jax.monitoring.register_event_duration_secs_listener(on_duration)
        cls._instance = stats
      return cls._instance

  @property
  def compiled(self) -> int:
    return self.programs - self.cached

  def describe(self) -> str:
    return (f"{self.programs} programs: {self.compiled} compiled, {self.cached} read from the compilation cache "
            f"({self.seconds:.1f} s)")
