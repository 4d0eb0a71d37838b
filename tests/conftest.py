"""Test-session setup: offline, CPU only, 8 fake devices, no network; under CI (CI=true) a skip is a failure.

Runs before any test module imports jax, so the XLA flag takes effect.
"""
import os
import socket


def _jaxlib_version() -> tuple[int, ...]:
    from importlib import metadata

    return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_SHARED_TFDS = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "tfds")
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("TFDS_DATA_DIR", _SHARED_TFDS) == _SHARED_TFDS:
    # pytest-xdist workers (addopts: -n) each generate their datasets in their own directory: two builds of one
    # dataset into one directory at the same moment would race.
    os.environ["TFDS_DATA_DIR"] = f"{_SHARED_TFDS}-{os.environ['PYTEST_XDIST_WORKER']}"
os.environ.setdefault("TFDS_DATA_DIR", _SHARED_TFDS)
# One persistent XLA cache for the session, shared with the xdist workers and the subprocess runs (they inherit the
# environment): the many tiny trainer runs compile the same programs, and a cache hit skips most of their start-up.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="harmoclip-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite is compile-bound (tiny models, many programs): XLA's backend optimisations (LLVM) double a compile (the
# tiny train step: 35 s instead of 17 here) to speed up runs that take milliseconds. Subprocess runs inherit this; the
# tests of pinned float bits opt back in (test_losses.py, `default_compiles`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# XLA:CPU's MLIR fusion emitters take half of a tiny program's compile (the tiny train step: 4 s of XLA's compile;
# 2 s with the classic emitters); the suite runs ~25 % faster. Subprocess runs inherit this. Unoptimised, the classic
# emitters round float32 tanh and exp a little differently: tests of the tightest bounds use `default_compiles`.
# jaxlib 0.12 removed the flag (an unknown flag in XLA_FLAGS is a fatal error there), and its fusion emitters are the
# only ones: the flag is for the jaxlib versions that have it, read from the installed metadata (jax not imported).
if "xla_cpu_use_fusion_emitters" not in _flags and _jaxlib_version() < (0, 11):
    _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only_connect(self, address):
    """Tests may talk to this machine (gloo, grain workers) and nowhere else."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        if not (host in ("localhost", "::1") or str(host).startswith("127.")):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only_connect


_IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def _skip_fails_in_ci(report) -> None:
    """CI proves what it claims: a test that did not run (a missing dependency, a skip marker) fails there."""
    if _IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_fails_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_fails_in_ci(outcome.get_result())  # a module-level skip (pytest.importorskip) skips at collection


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture
def default_compiles():
    """XLA's optimisations on for a test, as users compile (the emitter flag above stays: XLA_FLAGS are read once
    per process; optimised, both emitter kinds meet these bounds): pinned float bits and the tightest parity bounds
    hold there. The rest of the suite compiles without most optimisations (above), where float32 tanh and fusion
    boundaries round differently (e.g. quick_gelu 2.1e-6 off transformers' instead of 1.1e-6). The flag is not part
    of jit's cache key, so in-memory executables are dropped on the way in and out."""
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
    jax.clear_caches()


# Files by their measured CPU time, heaviest first; xdist (`--dist loadfile --no-loadscope-reorder`) hands them out in
# this order, so the two workers do not finish one long file after the other is idle. Unlisted files follow.
_HEAVIEST_FIRST = ("test_train_step.py", "test_resume.py", "test_siglip.py", "test_multiprocess.py", "test_eva02.py",
                   "test_train_e2e.py", "test_losses.py", "test_models.py", "test_tradeoff.py",
                   "test_tradeoff_tuned.py", "test_inference.py", "test_benchmarks.py", "test_readme.py",
                   "test_convert.py", "test_lexeme_vocab.py", "test_notebooks.py", "test_accelerator_suite.py")


# The cross-stack subset (`-m cross_stack`): what differs between the JAX versions README.md supports (XLA's
# numerics, the sharding and Orbax APIs, multi-process collectives) - parity with the reference libraries, RoIAlign,
# the losses, the sharded train step, checkpoints, the multi-host launch and resume, the notebooks. CI runs the whole
# suite on Python 3.11 (jax 0.10) and this subset on Python 3.12 (jax 0.12), where the whole suite runs too. Of the
# train-step file only the sharding tests: its feature tests (every method, uint8 images, canvas, text cache, distinct
# texts, clamping) compile a step each (~4 min of the subset's CPU) and check nothing that depends on JAX's version
# beyond what the sharded parity, the grad accumulation and the notebooks' training already run there; nor does the
# outside-family seam test (registration and config plumbing, whose training path the notebooks run).
CROSS_STACK = ("test_models.py", "test_convert.py", "test_roi_align.py", "test_losses.py", "test_token_lrc.py",
               "test_train_step.py::test_sharded_step_matches_single_device",
               "test_train_step.py::test_grad_accumulation_matches_sum_of_microbatch_losses",
               "test_train_step.py::test_checkpoint_restores_onto_other_meshes",
               "test_train_step.py::test_optimizer_masks", "test_checkpoint.py", "test_multiprocess.py",
               "test_notebooks.py", "test_siglip.py::test_remat_gives_same_gradients",
               "test_eva02.py::test_remat_gives_same_gradients")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
    for item in items:
        name = f"{item.path.name}::{item.name.split('[')[0]}"
        if item.path.name in CROSS_STACK or name in CROSS_STACK:
            item.add_marker(pytest.mark.cross_stack)
