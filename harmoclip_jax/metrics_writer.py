"""`workdir/metrics.jsonl` (one JSON object per logged step) and `workdir/config.json`, written by process 0."""
from __future__ import annotations

import json
import os
import pathlib

import ml_collections

from harmoclip_jax import workdir as workdir_lib


class MetricsWriter:
    """Appends one JSON line per record; `truncate_after(step)` drops records of steps a resumed run redoes."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, filename: str = workdir_lib.METRICS):
        self.path = pathlib.Path(workdir) / filename
        self.enabled = enabled
        self._file = None

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        if self.enabled:
            (self.path.parent / workdir_lib.CONFIG).write_text(config.to_json_best_effort(indent=2, sort_keys=True))

    def truncate_after(self, step: int) -> None:
        """Keeps only records with `step <= step` (a resumed run rewrites the later ones)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

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
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
