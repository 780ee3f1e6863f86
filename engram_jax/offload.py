"""Engram tables off the accelerator, under the names users import: `engram_jax.offload.X`.

The code lives in the `engram_jax.tables` package (its docstring is the map): `quant` (stored row
kinds), `files` (the table directory format), `host` (host and disk tables, the hot-row cache),
`batch` (a batch's rows gathered on the host and assembled in-graph) and `source` (the row source
every caller reads rows through). `Prefetcher` is in data.py. This module names them all in one
place for scripts, notebooks and benchmarks.
"""

from engram_jax.data import Prefetcher
from engram_jax.tables.batch import MIN_ROW_BUCKET, assemble_rows, place_contribution, prepare_rows, row_bucket
from engram_jax.tables.files import (FORMAT_VERSION, MANIFEST, TableFileError, check_manifest, checkpoint_table_reader,
                                     export_tables, read_manifest, write_table_dir)
from engram_jax.tables.host import (PLACEMENTS, HitCounter, HostTables, HotRowCache, available_memory, process_rows,
                                    random_access)
from engram_jax.tables.quant import (QUANTIZATIONS, SCALED, STORAGE, bytes_per_row, check_quantize, dequantize,
                                     quantize_rows)

__all__ = ["FORMAT_VERSION", "MANIFEST", "MIN_ROW_BUCKET", "PLACEMENTS", "QUANTIZATIONS", "SCALED", "STORAGE",
           "HitCounter", "HostTables", "HotRowCache", "Prefetcher", "TableFileError", "assemble_rows",
           "available_memory", "bytes_per_row", "check_manifest", "check_quantize", "checkpoint_table_reader",
           "dequantize", "export_tables", "place_contribution", "prepare_rows", "process_rows", "quantize_rows",
           "random_access", "read_manifest", "row_bucket", "write_table_dir"]
