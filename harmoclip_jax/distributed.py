"""Multi-process helpers (no-ops in a single process)."""
from __future__ import annotations

import os

import jax


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process reaches the barrier `name`; each name may be used once per run.

    Goes through the coordination service rather than a device collective: a long wait (one process building a
    dataset the others will read) must not trip the CPU gloo backend's 30 s rendezvous timeout.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.sync_global_processes(f"harmoclip/{name}", timeout=timeout_s,
                                    processes=set(range(jax.process_count())))


def launch_arguments(environ=os.environ) -> dict | None:
    """The `jax.distributed.initialize` arguments of this launch; None for a single process.

    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (README's multi-host launch) are passed explicitly:
    jax does not read them itself. Under SLURM or on a Cloud TPU slice the arguments are left to jax's detection.
    """
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not environ.get(name)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address} is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not: set JAX_NUM_PROCESSES=N and "
                             f"JAX_PROCESS_ID=i (0..N-1) for each process")
        try:
            num_processes, process_id = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError(f"JAX_NUM_PROCESSES={environ['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                             f"{environ['JAX_PROCESS_ID']!r} must be integers") from None
        if not 0 <= process_id < num_processes:
            raise ValueError(f"JAX_PROCESS_ID={process_id} must be in 0..{num_processes - 1} "
                             f"(JAX_NUM_PROCESSES={num_processes})")
        return {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id}
    if environ.get("SLURM_JOB_ID") or environ.get("TPU_WORKER_HOSTNAMES"):
        return {}  # jax's cluster detection fills everything in
    return None


def initialize_from_environment(environ=os.environ) -> bool:
    """`jax.distributed.initialize` for a multi-process launch (see `launch_arguments`); False for one process.

    Call it before anything touches the devices. On CPU the cross-process collectives go through gloo.
    """
    arguments = launch_arguments(environ)
    if arguments is None:
        return False
    # Only the CPU backend's cross-process collectives (without it a multi-process CPU run has none); GPU and TPU
    # collectives are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)
    if jax.default_backend() == "cpu" and jax.config.jax_compilation_cache_dir and \
            jax.config.jax_enable_compilation_cache:
        # Only process 0 writes the persistent compilation cache, so with one the processes of a CPU run reach their
        # first collectives apart: process 0 loads each program while the others compile it, and gloo under jax 0.12
        # hangs when peers arrive at a collective more than ~30 s apart (a loaded machine). CPU programs are cheap to
        # compile: every process compiles them.
        jax.config.update("jax_enable_compilation_cache", False)
        if jax.process_index() == 0:
            print("multi-process CPU run: the persistent compilation cache is off (processes that load programs "
                  "from it reach the gloo collectives apart from those that compile them)", flush=True)
    return True
