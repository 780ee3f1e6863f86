"""Engram tables: where their rows live, how they are read, how they are written.

Where rows live (the placement, chosen once per run or runner):
  device      the tables are params (memory.py: layout, `init_tables`, `split`/`merge`);
  host, disk  `host.HostTables`: numpy arrays in RAM, or memory maps of a table directory
              (`files`), optionally stored quantized (`quant`), with a hot-row cache on the
              devices (`host.HotRowCache`).

How rows are read: through one row source (`source`), built from the placement, which every
program that runs the model asks for its rows:
  device      in-graph `memory.gather` (a sharded lookup on a mesh);
  host, disk  the host gathers each batch's distinct rows minus the cache (`batch.prepare_rows`),
              they cross to the devices, and the program assembles them (`batch.assemble_rows`).
Decoding adds its own in-step reads (generation.py: from pinned host memory, or a host callback
into the same source). Training gathers host rows ahead of the step (host_training.RowFeed).

How rows are written (training): lazy Adam on the rows a step read, the same math everywhere
(`memory.adam_rows_math`): in the step for device tables (`memory.sparse_update`), on the host for
host and disk tables (`host_training.HostTrainTables.update`). Knowledge patches write rows into a
copy of device tables or an overlay of host tables (`source.RowSource.patch`).

`engram_jax.offload` names the public parts of `quant`, `files`, `host` and `batch` in one module.
"""
