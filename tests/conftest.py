"""Test set-up: 8 simulated CPU devices and fp32-exact matmuls, fixed before JAX is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# Modules that take minutes, run first: under `-n 2` each worker is first handed a block of
# consecutive tests, so these start at once (a module stays in one block: its module fixture
# runs once) instead of ending the run on one worker while the other idles.
_RUN_FIRST = ("tests/test_multihost.py",)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(_RUN_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the whole test run: both xdist workers and the
  child processes the tests start (benchmarks; `micro_run`'s `python -m rpt_jax.main` children
  keep their per-worker cache: moving them onto this one measured slower, 20:50 vs 17:49 for
  the suite). Many tests build the same small models and programs; a program compiled once is
  then loaded, not compiled again (the same executable: the cache key is the program, the
  compile options and the backend)."""
  base = tmp_path_factory.getbasetemp()
  # xdist workers' temp dirs (popen-gw0, ...) share the run's directory.
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  cache = str(root / "jax_compilation_cache")
  os.makedirs(cache, exist_ok=True)
  settings = {"jax_compilation_cache_dir": cache,
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)  # inherited by the child processes tests start
  yield
