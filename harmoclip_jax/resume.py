"""The resume contract and the one-run-per-workdir lock.

A workdir's `config.json` is the run's identity. Rerunning a workdir that has training checkpoints compares the new
config with it BEFORE anything is written: fields listed in `HARMLESS` (by prefix) may change freely; every other
field (the model, method, losses, batch, data stream, seed, optimizer, regions, ... : the default is "refuse")
changes the meaning of the saved state, so the run stops with one `ResumeRefusedError` naming each field
`name: old -> new`, unless `config.resume.allow_changes` names it (a field or a whole section). Accepted changes are
appended to `workdir/config_history.jsonl` (time, host, pid, step, each change and whether it was harmless or
allowed), and only then is `config.json` rewritten.

`WorkdirLock`: an advisory `fcntl.flock` on `workdir/.lock` held for the whole run by process 0 (other processes
of a multi-process run share the workdir legitimately). The OS drops it when the process dies, so `kill -9` never
leaves a stale lock; the holder's host and pid are written into the file for the refusal message.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
from typing import Any

from harmoclip_jax import workdir as workdir_lib

# Fields (dotted prefixes) that may change on resume: they change neither the model, the optimizer state's meaning
# nor the data stream. Anything not listed here is refused unless `config.resume.allow_changes` names it.
HARMLESS: dict[str, str] = {
    "total_steps": "extends (or shortens) the run",
    "eval_every": "when evaluations run",
    "eval_batch_size": "evaluation batching only",
    "log_every": "when metrics are logged",
    "progress_bar": "console only",
    "plot": "console only",
    "tensorboard": "logging only",
    "eval_picture": "logging only",
    "wandb": "logging only",
    "profile_steps": "a trace of some steps; the steps are the same",
    "mesh": "checkpoints restore onto any mesh",
    "sharding": "checkpoints restore onto any sharding",
    "checkpoint.every": "when checkpoints are written",
    "checkpoint.keep": "how many checkpoints are kept",
    "checkpoint.async_save": "how checkpoints are written",
    "checkpoint.export_params": "the params export at the end",
    "evals": "what is evaluated",
    "text_cache": "a cache of frozen-text-tower embeddings (keyed by the weights)",
    "debug": "testing aids",
    "resume": "this contract's own settings",
    "data.data_dir": "where the same dataset is read from",
    "data.eval_split": "evaluation only",
    "data.eval_max_regions": "evaluation only",
    "data.eval_captions": "evaluation only",
    "data.num_workers": "grain worker processes (the order of batches does not depend on them)",
    "data.worker_buffer_size": "prefetching only",
    "data.read_threads": "prefetching only",
    "data.read_buffer_size": "prefetching only",
    "init.hint": "a message",
    "region.distinct_lexemes": "how the same texts are encoded (each distinct one once), not what",
    "region.distinct_region_texts": "how the same texts are encoded (each distinct one once), not what",
    "model.attention_impl": "the same attention, another kernel",
}

_ABSENT = "<absent>"


class ResumeRefusedError(ValueError):
    """A rerun's config changes fields that the workdir's checkpoints depend on."""


class WorkdirLockedError(ValueError):
    """Another live process is training in this workdir."""


def is_harmless(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in HARMLESS)


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allow)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        if not tree and prefix:
            return {prefix: {}}
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _as_json(config) -> dict:
    """The config as `config.json` stores it (tuples become lists, ...)."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config, default=str))
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_changes(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (old, new)} for every differing leaf. A field the saved config lacks (written before the
    field existed) counts as its value in `defaults`, if given."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    default_flat = _flatten(defaults) if defaults else {}
    changes = {}
    for name in sorted(set(old_flat) | set(new_flat)):
        before = old_flat.get(name, default_flat.get(name, _ABSENT))
        after = new_flat.get(name, _ABSENT)
        if before != after:
            changes[name] = (before, after)
    return changes


def _fmt(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


def check_resume(workdir: str | os.PathLike, config) -> dict[str, tuple[Any, Any]] | None:
    """Compares `config` with the saved `config.json` of a workdir that has checkpoints; writes nothing.

    Returns None when there is nothing to resume (no checkpoint, or no saved config), else the accepted changes.
    Raises `ResumeRefusedError` listing every refused field and the two ways out.
    """
    workdir = pathlib.Path(workdir)
    steps = workdir_lib.checkpoint_steps(workdir)
    path = workdir / workdir_lib.CONFIG
    if not steps or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise ResumeRefusedError(f"{path} is not valid JSON ({error}); the run's identity is lost: restore it or "
                                 "train in a new --workdir") from None
    from harmoclip_jax import config_lib

    new = _as_json(config)
    changes = config_changes(saved, new, defaults=_as_json(config_lib.base_config(new.get("method", "harmoclip"))))
    allow = tuple(((new.get("resume") or {}).get("allow_changes")) or ())
    refused = {k: v for k, v in changes.items() if not is_harmless(k) and not _allowed(k, allow)}
    if refused:
        lines = "\n".join(f"  {name}: {_fmt(a)} -> {_fmt(b)}" for name, (a, b) in refused.items())
        quoted = ", ".join(repr(k) for k in refused) + ("," if len(refused) == 1 else "")
        raise ResumeRefusedError(
            f"workdir {workdir} holds checkpoints (steps {steps}) of a run with another config; these fields "
            f"differ from its {workdir_lib.CONFIG}:\n{lines}\nNothing was changed. Either train in a new --workdir, "
            f"or accept the changes explicitly with --config.resume.allow_changes=\"({quoted})\" (recorded in "
            f"{workdir / workdir_lib.CONFIG_HISTORY}).")
    return changes


def record(workdir: str | os.PathLike, event: str, step: int | None,
           changes: dict[str, tuple[Any, Any]] | None = None, allow: tuple[str, ...] = ()) -> None:
    """Appends one line to `workdir/config_history.jsonl`."""
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "host": socket.gethostname(), "pid": os.getpid(), "event": event, "step": step}
    if changes:
        entry["changes"] = {k: {"old": a, "new": b, "accepted_as": "harmless" if is_harmless(k) else "allowed"}
                            for k, (a, b) in changes.items()}
    with open(pathlib.Path(workdir) / workdir_lib.CONFIG_HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `workdir/.lock` (fcntl.flock) or raises `WorkdirLockedError` at once."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.path = pathlib.Path(workdir) / workdir_lib.LOCK
        self.enabled = enabled
        self._fd = None

    def __enter__(self):
        if not self.enabled:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown (starting up)"
            os.close(fd)
            raise WorkdirLockedError(f"workdir {self.path.parent} is in use by another run ({holder}); wait for it "
                                     "or stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
