"""Multi-process helpers (no-ops in a single process).

Losing a process (README's multi-host launch): when one process dies (kill -9, a crash, its host going down), the
next collective of each survivor fails at once (gloo: "Connection reset by peer"). `exit_if_process_lost`, called by
the training loop with that error, checks which processes are gone and ends the survivor with one line naming them,
the last checkpoint and what to do (relaunch every process: the relaunch resumes from that checkpoint), exit code
`LOST_PROCESS_EXIT_CODE`, without waiting for jax's exit-time shutdown (which blocks on the dead process until the
coordination service's heartbeat timeout, ~100 s, then aborts with a native stack dump). Not covered: a process lost
while the survivors wait in a checkpoint save's barriers (Orbax's, on the coordination service, not gloo); they learn
of it only at that heartbeat timeout, not within seconds. The relaunch resumes from the last finished checkpoint
all the same.

Process 0 hosts jax's coordination service. When *it* dies, each other process's coordination client notices the
closed connection at once: XLA logs "Terminating process because the JAX distributed service detected fatal errors"
and aborts (SIGABRT, a native stack dump) once it has symbolised its stack trace. The failed collective races it:
the survivor finds the service's address closed (a TCP check, not the service's RPCs, which retry) and usually ends
first (seen: 0.5 s after the kill), so its last line is the one line and its exit code LOST_PROCESS_EXIT_CODE, after
XLA's message; otherwise it ends with XLA's abort. The advice is the same: relaunch every process. jaxlib's hook that
would replace that termination (`missed_heartbeat_callback` of its distributed client) fails in this jax version
(std::bad_cast).
"""
from __future__ import annotations

import os
import sys
import threading
import time

import jax

from harmoclip_jax import workdir as workdir_lib

# Exit code of a survivor that ends because another process was lost: EX_TEMPFAIL (sysexits.h), "try again later":
# a relaunch of every process resumes.
LOST_PROCESS_EXIT_CODE = 75
# How long a survivor waits for the other survivors to check in after a failed collective.
PROBE_S = 5.0
_PROBE_KEY = "harmoclip/alive/"
_REPORT_LOCK = threading.Lock()


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


def lost_processes(timeout_s: float = PROBE_S) -> list[int]:
    """After a failed collective: the processes that did not check in with the coordination service (each survivor
    checks in, then waits until all have or `timeout_s` passed); [0] when the service (hosted by process 0) is
    unreachable. Call it at most once per run."""
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    client, me, count = state.client, jax.process_index(), jax.process_count()
    if me != 0 and state.coordinator_address and not _reachable(state.coordinator_address):
        return [0]  # quick, where the service's RPCs would retry: XLA may already be terminating this process
    try:
        client.key_value_set(f"{_PROBE_KEY}{me}", "1")
        deadline = time.monotonic() + timeout_s
        while True:
            present = {int(key.rsplit("/", 1)[-1]) for key, _ in client.key_value_dir_get(_PROBE_KEY)}
            if len(present) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - any failure to reach the service: its host, process 0, is gone
        return [0] if me != 0 else []
    return sorted(set(range(count)) - present)


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to `address` (HOST:PORT, the coordination service's) opens."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def lost_process_message(lost: list[int], count: int, workdir: str | os.PathLike, step: int | None) -> str:
    """The one line a survivor prints: which processes were lost, the last checkpoint, relaunch every process."""
    names = ", ".join(map(str, lost))
    who = f"process {names} of {count} was" if len(lost) == 1 else f"processes {names} of {count} were"
    at = f" at step {step}" if step is not None else ""
    steps = workdir_lib.checkpoint_steps(workdir)
    directory = os.path.join(os.fspath(workdir), workdir_lib.CHECKPOINTS)
    if steps:
        then = f"the last checkpoint is step {steps[-1]} in {directory}: relaunch every process with the same " \
               "command to resume from it"
    else:
        then = "no checkpoint was written yet: relaunch every process with the same command to start over"
    return f"{who} lost (killed, crashed or its host went down){at}; {then}"


def exit_if_process_lost(error: BaseException, workdir: str | os.PathLike, step: int | None = None) -> None:
    """In a multi-process run, when `error` (raised by a collective: a `jax.errors.JaxRuntimeError`) comes from
    the loss of another process: print the one line of `lost_process_message` and end this process now
    (`LOST_PROCESS_EXIT_CODE`; exit-time cleanup would wait on the dead process). Otherwise (one process, another
    error, every process still there) return, and the caller re-raises."""
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return
    lost = lost_processes()
    if not lost:
        return
    with _REPORT_LOCK:  # one line per process
        from harmoclip_jax import cli

        if cli.verbose():
            import traceback

            traceback.print_exception(error)
        print(f"error: {lost_process_message(lost, jax.process_count(), workdir, step)}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        if jax.process_index() == 0 and len(lost) < jax.process_count() - 1:
            time.sleep(PROBE_S)  # the coordination service lives here: let the other survivors finish their check
        os._exit(LOST_PROCESS_EXIT_CODE)
