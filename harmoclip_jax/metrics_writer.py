"""What a run logs, written by process 0: `workdir/metrics.jsonl` (one JSON object per logged step; the source of
truth, which resume truncates), `workdir/config.json`, and the optional mirrors of the same records: TensorBoard
event files (`workdir/tensorboard/`, tensorboardX) and a Weights & Biases run. `open_run_writer` puts them behind one
`RunWriter` (`write`, `write_image`, `truncate_after`, `close`)."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import struct
import sys
import time
from typing import Any, Iterator

import ml_collections
import numpy as np

from harmoclip_jax import workdir as workdir_lib

log = logging.getLogger(__name__)


def _write_atomic(path: pathlib.Path, data: str | bytes, tmp: pathlib.Path | None = None) -> None:
    """Writes `data` to a temporary file next to `path` (`tmp`, default `.NAME.tmp-PID`), then renames it over
    `path`: a crash leaves the old file or the new one, never a half-written one."""
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
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

    def truncate_after(self, step: int) -> list[dict]:
        """Keeps only records with `step <= step` (a resumed run rewrites the later ones) and returns them.
        Unparsable lines (a record torn by a crash mid-write) are dropped with a warning; the file is replaced
        atomically."""
        if not self.enabled or not self.path.exists():
            return []
        kept, records = [], []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                log.warning("%s line %d is not a JSON record (torn by a crash?); dropped: %.80r", self.path, number,
                            line)
            elif record.get("step", 0) <= step:
                kept.append(line)
                records.append(record)
        _write_atomic(self.path, "".join(line + "\n" for line in kept))
        return records

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


# ------------------------------------------------------------------------------------------------ mirrors


def _scalars(record: dict) -> Iterator[tuple[str, float]]:
    """(tag, value) of every number of a metrics record but its step; the tags are the record's keys."""
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            yield key, float(value)


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"write_image takes a uint8 (height, width, channels) image with 1, 3 or 4 channels, not "
                         f"{image.dtype} {image.shape}")
    return image


def _import_tensorboardx() -> None:
    """Loads tensorboardX without torch: its writer module imports torch whenever it is installed, only to accept
    torch tensors (the records are floats and numpy arrays). That costs seconds at every start and, on a GPU host,
    loads torch's CUDA libraries beside JAX's. So `import torch` fails while tensorboardX loads, unless torch is
    already loaded; afterwards torch imports as usual."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # a None entry makes `import torch` raise ImportError, which tensorboardX handles
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


# TensorBoard reads every file whose name contains "tfevents" (`io_wrapper.IsTensorFlowEventsFile`): the temporary
# file of a rewrite must not, or a crash during one would leave a duplicate that TensorBoard shows.
_EVENTS_MARK = "tfevents"
_REWRITE_PREFIX = ".rewrite-"


def _whole_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """(payload, framed bytes) of each whole record at the start of an event file, stopping at a record torn by a
    crash mid-write. The framing is TFRecord's, as tensorboardX's `RecordWriter` writes it: u64 length, its masked
    CRC-32C, the payload, its masked CRC-32C (little-endian). Every length is checked against its CRC, but a payload
    only when it is the file's last record: the writer only appends, so a crash tears nothing but the end, and
    tensorboardX's CRC-32C runs in pure Python (~4 MB/s), slow over a long run's files."""
    _import_tensorboardx()
    from tensorboardX.record_writer import masked_crc32c

    records, offset = [], 0
    while offset + 12 <= len(data):
        header = data[offset:offset + 8]
        if struct.unpack("<I", data[offset + 8:offset + 12])[0] != masked_crc32c(header):
            break
        end = offset + 12 + struct.unpack("<Q", header)[0] + 4
        if end > len(data):
            break
        payload = data[offset + 12:end - 4]
        if end == len(data) and struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
            break
        records.append((payload, data[offset:end]))
        offset = end
    return records


def truncate_event_files(directory: str | os.PathLike, step: int) -> set[tuple[int, str]]:
    """Drops the events of steps after `step` (those a resumed run redoes) from every event file in `directory` and
    returns the (step, tag) of the values that stay. Kept records stay byte for byte (each is parsed with
    tensorboardX's own `Event` class only to read its step; the file_version record has step 0, so it stays). A file
    that changes is rewritten atomically: a temporary file whose name TensorBoard ignores, fsync, `os.replace`, so a
    crash leaves the old file or the new one. A torn last record is dropped with a warning; a file left without any
    value is removed."""
    directory = pathlib.Path(directory)
    kept_values: set[tuple[int, str]] = set()
    if not directory.is_dir():
        return kept_values
    from google.protobuf.message import DecodeError

    _import_tensorboardx()
    from tensorboardX.proto.event_pb2 import Event

    for stale in directory.glob(f"{_REWRITE_PREFIX}*"):  # a rewrite a crash interrupted: its original is whole
        stale.unlink()
    for path in sorted(p for p in directory.iterdir() if _EVENTS_MARK in p.name and p.is_file()):
        data = path.read_bytes()
        kept, values, used = [], set(), 0
        for payload, framed in _whole_records(data):
            try:
                event = Event.FromString(payload)
            except DecodeError:
                break
            used += len(framed)
            if event.step <= step:
                kept.append(framed)
                values.update((int(event.step), value.tag) for value in event.summary.value)
        if used < len(data):
            log.warning("%s: the %d bytes from offset %d are not a whole event record (torn by a crash?); dropped",
                        path, len(data) - used, used)
        if not values:
            path.unlink()
        elif sum(map(len, kept)) < len(data):
            _write_atomic(path, b"".join(kept), tmp=directory / f"{_REWRITE_PREFIX}{os.getpid()}")
        kept_values |= values
    return kept_values


class TensorBoardSink:
    """TensorBoard event files in `directory` (tensorboardX's `SummaryWriter`): each record's numbers as scalars,
    tagged with the record's keys, at the record's step (TensorBoard stores them as float32). A new event file per
    run or resume, opened at the first write, after `truncate_after` has cut the older ones."""

    def __init__(self, directory: str | os.PathLike, flush_secs: int = 30):
        self.directory = pathlib.Path(directory)
        self.flush_secs = flush_secs
        self._writer = None

    def _summary_writer(self):
        if self._writer is None:
            _import_tensorboardx()
            from tensorboardX import SummaryWriter

            # tensorboardX names a file by the second and the host and opens it with "wb": a suffix in nanoseconds
            # keeps a writer opened within the same second (a resume, a rerun in a notebook) from overwriting the
            # file just truncated, and the names in time order (TensorBoard reads the files in name order).
            # max_queue: the loop never waits for the writer thread (a record is ~30 values).
            self._writer = SummaryWriter(logdir=str(self.directory), flush_secs=self.flush_secs, max_queue=1000,
                                         filename_suffix=f".{time.time_ns()}")
        return self._writer

    def truncate_after(self, step: int, records: list[dict]) -> None:
        """Cuts the event files to `step` and writes the values of metrics.jsonl's kept `records` that no event file
        holds: tensorboardX writes from a thread and fsyncs every `flush_secs`, so `kill -9` loses the last few
        values that metrics.jsonl (line-buffered) has; the source of truth fills them in."""
        self.close()
        present = truncate_event_files(self.directory, step)
        for record in records:
            missing = {tag: value for tag, value in _scalars(record) if (record["step"], tag) not in present}
            if missing:
                self.write({"step": record["step"], **missing})

    def write(self, record: dict) -> None:
        writer = self._summary_writer()
        for tag, value in _scalars(record):
            writer.add_scalar(tag, value, global_step=int(record["step"]))

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._summary_writer().add_image(tag, image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # drains the queue and fsyncs
            self._writer = None


def check_wandb(settings: ml_collections.ConfigDict | None) -> None:
    """One clear error, before training starts, when `config.wandb` asks for Weights & Biases without the package
    (a ValueError: the command line prints it as one line)."""
    import importlib.util

    if settings and settings.get("project") and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"config.wandb.project={settings.project!r} logs to Weights & Biases, but the wandb package "
                         "is not installed: pip install wandb (or leave config.wandb.project empty)")


class WandbSink:
    """A Weights & Biases run (`config.wandb`: project, entity, name, mode) that gets the same scalars and images.
    Its files go to WANDB_DIR when set, else to workdir/wandb/. The run id is kept in workdir/wandb_run_id.txt, so a
    resumed run continues the same W&B run (resume="allow"). W&B cannot rewind a run: the steps a resume redoes are
    logged again, and an online run keeps the values first logged (W&B ignores a step below its last one);
    metrics.jsonl and TensorBoard hold the redone ones."""

    def __init__(self, workdir: pathlib.Path, settings: ml_collections.ConfigDict, run_config: dict):
        check_wandb(settings)
        import wandb

        self._wandb = wandb
        id_file = workdir / workdir_lib.WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.exists() else None
        try:
            self._run = wandb.init(project=settings.project, entity=settings.entity or None,
                                   name=settings.name or None, mode=settings.mode, id=run_id,
                                   resume="allow" if run_id else None, config=run_config,
                                   allow_val_change=True,  # harmless changes on resume (total_steps, ...)
                                   dir=None if os.environ.get("WANDB_DIR") else str(workdir))
        except wandb.errors.Error as error:  # no API key, no network, a bad entity: the user's to fix, in one line
            raise ValueError(f"Weights & Biases (config.wandb, mode {settings.mode!r}) did not start: {error} "
                             "(`wandb login`, or --config.wandb.mode=offline and `wandb sync` later)") from error
        if run_id is None and settings.mode != "disabled":  # a disabled run's id names no run
            _write_atomic(id_file, self._run.id + "\n")

    def truncate_after(self, step: int, records: list[dict]) -> None:
        del step, records  # W&B runs cannot be cut (class docstring)

    def write(self, record: dict) -> None:
        values = dict(_scalars(record))
        if values:
            self._run.log(values, step=int(record["step"]))

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._run.log({tag: self._wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class RunWriter:
    """metrics.jsonl and its mirrors (TensorBoard, W&B) behind one interface: each record goes to all of them;
    `truncate_after(step)` on resume cuts metrics.jsonl (the source of truth) and the event files to the restored
    step. With `enabled=False` (processes other than 0) everything is a no-op."""

    def __init__(self, metrics: MetricsWriter, sinks: tuple = ()):
        self.metrics = metrics
        self.sinks = tuple(sinks)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        self.metrics.write_config(config)

    def truncate_after(self, step: int) -> None:
        records = self.metrics.truncate_after(step)
        for sink in self.sinks:
            sink.truncate_after(step, records)

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        for sink in self.sinks:
            sink.write(record)

    def write_image(self, step: int, tag: str, image: Any) -> None:
        """A uint8 (height, width, channels) picture at `step` to TensorBoard and W&B (not to metrics.jsonl)."""
        image = _check_image(image)
        for sink in self.sinks:
            sink.write_image(step, tag, image)

    def close(self) -> None:
        self.metrics.close()
        for sink in self.sinks:
            sink.close()


def open_run_writer(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *,
                    enabled: bool = True) -> RunWriter:
    """The run's `RunWriter`: metrics.jsonl, plus event files in workdir/tensorboard/ (`config.tensorboard`) and a
    W&B run (`config.wandb.project`), on process 0 (`enabled`)."""
    workdir = pathlib.Path(workdir)
    sinks = []
    if enabled and config.get("tensorboard", True):
        sinks.append(TensorBoardSink(workdir / workdir_lib.TENSORBOARD))
    wandb_settings = config.get("wandb")
    if enabled and wandb_settings is not None and wandb_settings.project:
        sinks.append(WandbSink(workdir, wandb_settings, json.loads(config.to_json_best_effort())))
    return RunWriter(MetricsWriter(workdir, enabled=enabled), sinks)
