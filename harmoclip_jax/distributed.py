"""Multi-process helpers (no-ops in a single process)."""
from __future__ import annotations

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
