"""`workdir/metrics.jsonl` (one JSON object per logged step) and `workdir/config.json`, written by process 0."""
from __future__ import annotations

import json
import logging
import os
import pathlib

import ml_collections

from harmoclip_jax import workdir as workdir_lib

log = logging.getLogger(__name__)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes `text` to a temporary file next to `path`, then renames it over `path` (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsWriter:
    """Appends one JSON line per record; `truncate_after(step)` drops records of steps a resumed run redoes."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, filename: str = workdir_lib.METRICS):
        self.path = pathlib.Path(workdir) / filename
        self.enabled = enabled
        self._file = None

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        if self.enabled:
            _write_atomic(self.path.parent / workdir_lib.CONFIG, config.to_json_best_effort(indent=2, sort_keys=True))

    def truncate_after(self, step: int) -> None:
        """Keeps only records with `step <= step` (a resumed run rewrites the later ones). Unparsable lines (a
        record torn by a crash mid-write) are dropped with a warning; the file is replaced atomically."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                log.warning("%s line %d is not a JSON record (torn by a crash?); dropped: %.80r", self.path, number,
                            line)
            elif record.get("step", 0) <= step:
                kept.append(line)
        _write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one record
        self._file.write(json.dumps(record, sort_keys=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file. A torn last line (a crash mid-write) is skipped with a warning; any
    other bad line is an error."""
    lines = [line for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    if lines and _parse(lines[-1]) is None:
        log.warning("%s: the last line is not a JSON record (torn by a crash?); skipped: %.80r", path, lines[-1])
        lines = lines[:-1]
    return [json.loads(line) for line in lines]
