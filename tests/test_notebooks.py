"""The notebooks run top to bottom and draw their plots.

ENGRAM_NOTEBOOK_SMOKE=1 makes each notebook train for a handful of steps on tiny shapes, so the
whole file costs a few compilations; the plots then show the pipeline working, not a trained model.
"""

import os
import tempfile

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
# Notebook -> plots it must show (image/png outputs).
NOTEBOOKS = {"quickstart": 2, "engram_as_memory": 1, "sparsity_allocation": 2, "knowledge_patch": 1}


def _kernel_env(workdir: str) -> dict:
  env = dict(os.environ)
  env["ENGRAM_NOTEBOOK_SMOKE"] = "1"
  env["ENGRAM_NOTEBOOK_WORKDIR"] = workdir
  env["JAX_PLATFORMS"] = "cpu"
  # The test process's fake 8-device CPU platform would split the notebooks' small batches eight
  # ways on two cores: give the kernel (and the scripts it starts) the real device count.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  # The persistent compilation cache the test processes share (conftest.py): the notebooks compile
  # the same tiny train and eval steps, so a later notebook finds an earlier one's programs.
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "engram_jax_test_xla_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # A headless backend set for the test run would swallow plt.show(): use the notebook's own.
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  return env


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_top_to_bottom_and_plots(name, tmp_path):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  try:
    client.execute(env=_kernel_env(str(tmp_path)))
  finally:
    nbformat.write(nb, str(tmp_path / f"{name}.executed.ipynb"))  # for reading a failure
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= NOTEBOOKS[name], f"{name}: {len(images)} plots, expected {NOTEBOOKS[name]}"
  # The install cell found the package importable and installed nothing.
  setup_text = "".join(o.get("text", "") for o in nb.cells[1].get("outputs", []))
  assert "smoke mode True" in setup_text and "Successfully installed" not in setup_text
