"""The accelerator suite (issue 17, item 4): every speed figure the project quotes for a GPU, in one bounded run.

    benchmarks/accelerator_suite.sh [--wheels DIR] [--tiny] [-- suite options]   # the prepared command (see there)
    python benchmarks/accelerator_suite.py [--tiny] [--cases train_step,encode] [--budget_s 450]

Cases, in the order they run (each in its own process, each under a time bound, the whole under --budget_s):
  train_step        ours: the HarmoCLIP train step (benchmarks/train_step.py's `ours`: GC + LRC + GR-a, text tower
                    frozen + cached, AdamW) in --dtype at --batch x --boxes; images/s, XLA's flops, MFU against a
                    --dtype matmul peak measured in the same process, peak device memory (memory_stats()).
  matmul_peak       the peak that MFU divides by, as its own line (ours: measured TFLOP/s; reference: the H200/H100
                    datasheet's dense bf16 989 TFLOP/s when the device is one of them).
  train_step_torch  the same step in PyTorch (benchmarks/train_step.py's `reference`: transformers CLIPModel, SDPA
                    attention, bf16 autocast, AdamW) on CUDA; ours is the train_step figure. Needs CUDA.
  encode            benchmarks/encode.py: jitted encode_image vs transformers get_image_features (bf16 autocast)
                    on CUDA; without CUDA ours alone.
  roi_align         ours (harmoclip_jax.ops.roi_align) vs torchvision.ops.roi_align on CUDA, forward and
                    forward+backward, 1x1 and 7x7, at --batch x --boxes on a 14x14x768 map. Needs CUDA.
  pipeline          input pipeline at all cores: grain (benchmarks/pipeline.py) when grain and TFDS import, else
                    JPEG decode + bicubic resize + normalise in a process pool of all cores vs the same in one
                    process (the field "mode" says which ran).
  max_batch         the largest batch of the train step that compiles and runs, without and with remat: an
                    ascending search over --search_batches that stops at the first OOM or at its time bound.
  aot_memory        `python -m harmoclip_jax.aot`'s prediction for this GPU (compiled without it, in a child
                    process that sees no GPU) against the real run: the project's trainer (configs/vitb16.py in
                    --dtype at --batch x --boxes), two steps, memory_stats()["peak_bytes_in_use"]. Needs an H100/H200.

Every line is the project's benchmark format ({"bench", "case", "unit", "ours", "reference", "reference_name",
"speedup", "cpu"}) plus "device"; a case that could not run says why in "skipped" (e.g. "no CUDA") or "error"
(nonzero exit). grain is not on the train step's path but harmoclip_jax.train imports it (through the evaluators):
where it is absent an inert stub stands in (the field "grain" says "stub").
"""
from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FORMAT = ("bench", "case", "unit", "ours", "reference", "reference_name", "speedup", "cpu")
CASES = ("train_step", "train_step_torch", "encode", "roi_align", "pipeline", "max_batch", "aot_memory")
CUDA_ONLY = ("train_step_torch", "roi_align")  # PyTorch on CUDA is the point of these; skipped without it
# Seconds each case may take on the GPU (the whole run is also capped by --budget_s); --tiny scales them.
BOUNDS = {"train_step": 110, "train_step_torch": 80, "encode": 70, "roi_align": 40, "pipeline": 40,
          "max_batch": 130, "aot_memory": 120}
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0}  # dense bf16, SXM, by the vendor's datasheet
HIDE_ENV = "ACCEL_SUITE_HIDE_MODULES"  # comma-separated top-level modules made unimportable (tests: a bare box)


# --------------------------------------------------------------------------------------- environment


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} ({HIDE_ENV})", name=fullname)
        return None


def _stub_grain() -> str:
    """'real', or 'stub': an inert module standing in for grain, whose every attribute is a placeholder class.
    harmoclip_jax.data.pipeline subclasses grain's datasets at import time and train imports it via the
    evaluators, but the train step, encode and RoIAlign never call grain."""
    try:
        import grain  # noqa: F401

        return "real"
    except ImportError:
        pass
    module = types.ModuleType("grain")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        class Placeholder:
            def __init__(self, *args, **kwargs):
                raise RuntimeError(f"grain.{name}: grain is not installed (the accelerator suite's stub)")

        Placeholder.__name__ = Placeholder.__qualname__ = name
        setattr(module, name, Placeholder)
        return Placeholder

    module.__getattr__ = __getattr__
    module.__version__ = "0+accelerator_suite_stub"
    sys.modules["grain"] = module
    return "stub"


def _setup() -> str:
    hidden = [x for x in os.environ.get(HIDE_ENV, "").split(",") if x]
    if hidden:
        sys.meta_path.insert(0, _Hide(hidden))
    return _stub_grain()


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False


# ------------------------------------------------------------------------------------------- helpers


def _line(bench, case, unit, ours=None, reference=None, reference_name=None, **extra):
    from harmoclip_jax.testing.machine import cpu_description

    speedup = ours / reference if ours and reference else None
    return {"bench": bench, "case": case, "unit": unit, "ours": ours, "reference": reference,
            "reference_name": reference_name, "speedup": speedup, "cpu": cpu_description(), **extra}


def _emit(line):
    print(json.dumps(line), flush=True)


def _jax_device():
    import jax

    d = jax.devices()[0]
    return d, str(d.device_kind), jax.default_backend()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemory"))


def _step_args(args, batch, remat=False):
    return argparse.Namespace(family="clip", variant=args.variant, size=args.size, batch=batch, boxes=args.boxes,
                              steps=args.steps, dtype=args.dtype, threads=os.cpu_count() or 1, remat=remat)


def _matmul_tflops(dtype: str, n: int, calls: int = 10) -> float:
    """An n x n x n matmul on random data (not zeros: METHOD.md) in `dtype`: best of 5 windows of `calls` calls
    queued back to back and one sync (a lone call's dispatch and sync would understate the peak, inflating MFU)."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype) for i in (0, 1))
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            out = mm(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * n**3 / best / 1e12


# --------------------------------------------------------------------------------------------- cases


def case_train_step(args, grain):
    import numpy as np
    from train_step import _batch, ours

    from harmoclip_jax.models import registry

    device, kind, backend = _jax_device()
    embed = registry.get("clip").get_config(args.variant).embed_dim
    batch = _batch(np.random.default_rng(0), args.batch, args.boxes, args.size, embed)
    seconds, flops, region_seconds, peak_bytes = ours(_step_args(args, args.batch), batch)
    peak_tflops = _matmul_tflops(args.dtype, args.matmul_n)
    case = {"variant": args.variant, "image_size": args.size, "batch": args.batch, "boxes_per_image": args.boxes,
            "dtype": args.dtype, "method": "harmoclip (GC+LRC+GR-a), text tower frozen + cached", "remat": False,
            "backend": backend}
    rate = args.batch / seconds
    _emit(_line("train_step", case, "images/s", rate, device=kind, grain=grain, s_per_step=seconds,
                xla_gflops_per_step=flops / 1e9, peak_tflops=peak_tflops,
                peak_source=f"{args.matmul_n}^3 {args.dtype} matmul, random data, best of 5 x 10 calls, this process",
                mfu=flops / seconds / (peak_tflops * 1e12),
                roi_and_region_loss_share=region_seconds / seconds,
                peak_device_memory_gib=peak_bytes / 2**30 if peak_bytes else None,
                memory_stats="peak_bytes_in_use" if peak_bytes else "not reported by this backend"))
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in kind), None)
    _emit(_line("matmul_peak", {"n": args.matmul_n, "dtype": args.dtype, "backend": backend}, "TFLOP/s",
                peak_tflops, datasheet if args.dtype == "bfloat16" else None,
                "vendor datasheet, dense bf16 (H100/H200 SXM)" if datasheet and args.dtype == "bfloat16" else None,
                device=kind))


def case_train_step_torch(args, grain):
    if not _cuda():
        _, kind, _ = _jax_device()
        _emit(_line("train_step_torch", {"variant": args.variant}, "images/s", device=kind, skipped="no CUDA"))
        return
    import numpy as np
    import torch
    from train_step import _batch, reference

    from harmoclip_jax.models import registry

    embed = registry.get("clip").get_config(args.variant).embed_dim
    batch = _batch(np.random.default_rng(0), args.batch, args.boxes, args.size, embed)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    info = {}
    seconds = reference(_step_args(args, args.batch), batch, device="cuda", autocast_dtype=autocast, info=info)
    peak = torch.cuda.max_memory_allocated()
    case = {"variant": args.variant, "image_size": args.size, "batch": args.batch, "boxes_per_image": args.boxes,
            "dtype": args.dtype, "attention": info.get("attention"), "torch": torch.__version__}
    # "ours" comes from the train_step line (another process): the orchestrator fills it in.
    _emit(_line("train_step_torch", case, "images/s", None, args.batch / seconds,
                f"transformers CLIPModel + torch losses/AdamW, {'bf16 autocast' if autocast else args.dtype}, "
                f"{info.get('attention')} attention (PyTorch CUDA)",
                device=torch.cuda.get_device_name(), s_per_step=seconds, peak_device_memory_gib=peak / 2**30))


def case_roi_align(args, grain):
    if not _cuda():
        _, kind, _ = _jax_device()
        _emit(_line("roi_align", {"B": args.batch, "T": args.boxes}, "boxes/s", device=kind, skipped="no CUDA"))
        return
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchvision
    from roi_align_vs_torchvision import SCALE, torchvision_rois

    from harmoclip_jax.ops.roi_align import roi_align

    rng = np.random.default_rng(0)
    b, t, grid, c = args.batch, args.boxes, 14, 768
    features = rng.normal(size=(b, grid, grid, c)).astype(np.float32)
    centre, size = rng.uniform(0, 224, (b, t, 2)), rng.uniform(16, 224, (b, t, 2))
    boxes = np.clip(np.concatenate([centre - size / 2, centre + size / 2], -1), 0, 224).astype(np.float32)
    features_jax, boxes_jax = jnp.asarray(features), jnp.asarray(boxes)
    features_torch = torch.tensor(features).permute(0, 3, 1, 2).contiguous().cuda()
    rois = torchvision_rois(boxes, "cuda")

    def per_call(fn, n=args.roi_iters):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    for o in (1, 7):
        forward = jax.jit(lambda f: roi_align(f, boxes_jax, (o, o), SCALE))
        backward = jax.jit(jax.grad(lambda f: jnp.sum(roi_align(f, boxes_jax, (o, o), SCALE) ** 2)))
        ref = torchvision.ops.roi_align(features_torch, rois, (o, o), SCALE, -1, True)
        got = np.asarray(forward(features_jax))
        max_diff = float(np.abs(got - ref.permute(0, 2, 3, 1).reshape(got.shape).cpu().numpy()).max())
        leaf = features_torch.clone().requires_grad_()

        def torch_forward():
            torchvision.ops.roi_align(features_torch, rois, (o, o), SCALE, -1, True)
            torch.cuda.synchronize()

        def torch_backward():
            torch.autograd.grad((torchvision.ops.roi_align(leaf, rois, (o, o), SCALE, -1, True) ** 2).sum(), leaf)
            torch.cuda.synchronize()

        pairs = [("forward", per_call(lambda: forward(features_jax).block_until_ready()), per_call(torch_forward)),
                 ("forward+backward", per_call(lambda: backward(features_jax).block_until_ready()),
                  per_call(torch_backward))]
        for mode, ours_s, ref_s in pairs:
            case = {"B": b, "T": t, "grid": f"{grid}x{grid}x{c}", "output": f"{o}x{o}", "mode": mode,
                    "sampling_ratio": -1, "aligned": True, "dtype": "float32"}
            _emit(_line("roi_align", case, "boxes/s", b * t / ours_s, b * t / ref_s,
                        f"torchvision.ops.roi_align CUDA (torchvision {torchvision.__version__})",
                        device=torch.cuda.get_device_name(), max_abs_diff_vs_torchvision=max_diff))


def _decode(job):
    """One image of the pipeline's per-example work: `data.images.decode_image` (JPEG draft decode, bicubic squash
    to size, CLIP-normalise), the module the grain workers call, importable without grain or TFDS."""
    from harmoclip_jax.data.images import decode_image

    data, size, mean, std = job
    return decode_image(data, size, mean, std)


def _jpegs(n, width, height):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    y, x = np.mgrid[0:height, 0:width]
    for i in range(n):  # smooth gradients plus noise: closer to photographs than pure noise or flat colour
        base = np.stack([(x * (i + 1) % 256), (y * (i + 2) % 256), ((x + y) * (i + 3) % 256)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def case_pipeline(args, grain):
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mode = args.pipeline
    if mode == "auto":
        mode = "grain" if grain == "real" and _importable("tensorflow_datasets") and not args.tiny else "pool"
    if mode == "grain":
        workers = max(cores - 1, 1)
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), "--workers", "0",
                               str(workers), "--batches", "10", "--repeats", "2"], capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:])
        for text in proc.stdout.splitlines():
            if text.startswith("{"):
                line = json.loads(text)
                line.update(mode="grain (benchmarks/pipeline.py)", cores=cores)
                _emit(line)
        if proc.returncode:
            raise SystemExit(proc.returncode)
        return
    images = _jpegs(args.pipeline_images, *args.pipeline_source)
    from harmoclip_jax.models.normalization import OPENAI_CLIP

    jobs = [(data, args.size, OPENAI_CLIP[0], OPENAI_CLIP[1]) for data in images]  # workers import data.images only

    def rate(run):
        run(jobs[:cores])  # warm-up (worker start-up, imports)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.pipeline_window_s:
            count += len(run(jobs))
        return count / (time.perf_counter() - start)

    reference = rate(lambda js: [_decode(j) for j in js])
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        ours = rate(lambda js: pool.map(_decode, js, chunksize=max(len(js) // (4 * cores), 1)))
    case = {"mode": "process pool: data.images.decode_image (JPEG draft decode, bicubic resize, CLIP normalise; "
                    "grain/TFDS absent or not asked "
                    "for; no tokenize, no region subset)" if mode == "pool" else mode,
            "processes": cores, "source": "x".join(map(str, args.pipeline_source)), "image_size": args.size,
            "images_per_window": len(jobs), "window_s": args.pipeline_window_s}
    _, kind, _ = _jax_device()
    _emit(_line("pipeline", case, "images/s", ours, reference, "the same per-image work in one process",
                device=kind, cores=cores, grain=grain))


def case_encode(args, grain):
    """benchmarks/encode.py in this process (the orchestrator turned XLA's preallocation off: torch shares the GPU)."""
    import contextlib
    import io
    import runpy

    cuda = _cuda()
    script = str(ROOT / "benchmarks" / "encode.py")
    saved, sys.argv = sys.argv, [script, "--family", "clip", "--variant", args.variant, "--batch", str(args.batch),
                                 "--dtype", args.dtype, "--iters", str(args.encode_iters),
                                 *([] if cuda else ["--no_reference"])]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved
    _, kind, _ = _jax_device()
    for text in out.getvalue().splitlines():
        if text.startswith("{"):
            line = json.loads(text)
            line.update(device=kind, grain=grain)
            if not cuda:
                line["reference_skipped"] = "no CUDA: transformers on GPU not run"
            _emit(line)


def _search(args, remat: bool, deadline: float):
    """Ascending batches until the first OOM or until the next one would not finish before `deadline`."""
    import gc

    import jax
    import numpy as np
    from train_step import _batch

    from harmoclip_jax import config_lib, sharding, train
    from harmoclip_jax.models import registry

    embed = registry.get("clip").get_config(args.variant).embed_dim
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])
    # Random inputs for 64 images, tiled up to each batch: drawing 8192 x 224 x 224 x 3 normals would take longer
    # than the step (the values do not matter for memory or speed, as long as they are not zeros).
    base = _batch(np.random.default_rng(0), min(64, max(args.search_batches)), args.boxes, args.size, embed)
    tried, largest, last_seconds = [], None, 0.0
    for batch_size in args.search_batches:
        if time.perf_counter() + 1.2 * last_seconds > deadline:  # a try costs about the last one (compile-bound)
            tried.append({"batch": batch_size, "result": "not tried: time bound"})
            break
        start = time.perf_counter()
        c = config_lib.base_config("harmoclip")
        c.model.variant, c.model.image_size, c.model.dtype, c.model.remat = args.variant, args.size, args.dtype, remat
        c.data.max_regions = args.boxes
        c.batch_size = c.eval_batch_size = batch_size
        c.total_steps = 10_000
        entry = {"batch": batch_size}
        try:
            if args.simulate_oom_above and batch_size > args.simulate_oom_above:  # --tiny: the OOM exit, cheaply
                raise MemoryError(f"RESOURCE_EXHAUSTED (simulated: --simulate_oom_above {args.simulate_oom_above})")
            trainer = train.build_trainer(c, mesh)
            keys = train.device_batch_keys(trainer, cache_active=True)
            batch = {k: np.resize(v, (batch_size, *v.shape[1:])) for k, v in base.items()}
            with jax.set_mesh(mesh):
                state = trainer.init_state()
                device_batch = sharding.put_batch({k: batch[k] for k in keys}, mesh)
                compiled = trainer.train_step.lower(state, device_batch, {}).compile()
                memory = compiled.memory_analysis()
                if memory is not None:
                    entry["xla_temp_gib"] = round(memory.temp_size_in_bytes / 2**30, 3)
                state, metrics = compiled(state, device_batch, {})  # the first call also allocates
                jax.block_until_ready(metrics["loss"])
                step_start = time.perf_counter()
                state, metrics = compiled(state, device_batch, {})
                jax.block_until_ready(metrics["loss"])
                entry["images_per_s"] = round(batch_size / (time.perf_counter() - step_start), 2)
            entry["result"] = "fits"
            largest = batch_size
        except Exception as error:  # noqa: BLE001 - an OOM ends the search; anything else is reported
            entry["result"] = "OOM" if _is_oom(error) else f"error: {type(error).__name__}: {str(error)[:300]}"
        finally:
            trainer = state = device_batch = compiled = metrics = None
            gc.collect()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        last_seconds = time.perf_counter() - start
        tried.append(entry)
        sys.stderr.write(f"max_batch remat={remat}: {json.dumps(entry)}\n")  # survives a crash of this process
        sys.stderr.flush()
        if entry["result"] != "fits":
            break
    stats = jax.devices()[0].memory_stats() or {}
    return largest, tried, stats.get("bytes_limit")


def case_max_batch(args, grain):
    """--remat off / on: one search (the GPU runs each in its own process); both: the two in turn (--tiny)."""
    start = time.perf_counter()
    _, kind, backend = _jax_device()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    for i, remat in enumerate(modes):
        share = (args.case_budget_s - (time.perf_counter() - start)) / (len(modes) - i)
        largest, tried, limit = _search(args, remat, time.perf_counter() + share)
        stopped = tried[-1]["result"] if tried else "nothing tried"
        case = {"variant": args.variant, "image_size": args.size, "boxes_per_image": args.boxes,
                "dtype": args.dtype, "remat": remat, "searched": tried, "stopped_at": stopped, "backend": backend}
        _emit(_line("max_batch", case, "images/batch", largest, device=kind, grain=grain,
                    device_bytes_limit_gib=limit / 2**30 if limit else None,
                    note="largest batch in the searched list that compiled and ran two steps; a lower bound when "
                         "the search stopped on its time bound or ran out of list"))


def _vitb16_config(args):
    """configs/vitb16.py at the suite's sizes, trained from a random init (no weights on the device machine)."""
    from harmoclip_jax import config_lib

    config = config_lib.load_config(f"{ROOT}/configs/vitb16.py:dtype={args.dtype}")
    config.batch_size = config.eval_batch_size = args.batch
    config.data.max_regions = args.boxes
    config.init.mode, config.init.params_dir = "scratch", None
    config.evals = {}
    if args.tiny:
        config.model.variant, config.model.image_size = args.variant, args.size
    return config


def case_aot_memory(args, grain):
    """The deviceless prediction (a child process on the CPU platform) against this device's measured peak."""
    import tempfile

    _, kind, backend = _jax_device()
    from harmoclip_jax import accelerators

    chip = accelerators.chip_for(kind) if backend == "gpu" else None
    case = {"variant": args.variant, "batch": args.batch, "boxes_per_image": args.boxes, "dtype": args.dtype}
    if chip is None or chip.name not in ("h100", "h200"):
        _emit(_line("aot_memory", case, "GiB", device=kind, skipped=f"not an H100/H200 ({kind})"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "prediction.json"
        env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        child = subprocess.run([sys.executable, __file__, "--_case", "aot_predict", "--_out", str(out),
                                "--_target", f"gpu:{chip.name}:1x1x1", *sys.argv[sys.argv.index("--_case") + 2:]],
                               env=env, capture_output=True, text=True, cwd=ROOT)
        if child.returncode:
            raise RuntimeError(f"the prediction failed: {child.stderr[-1500:]}")
        predicted = json.loads(out.read_text())
    import jax
    import numpy as np

    from harmoclip_jax import sharding
    from harmoclip_jax import train as train_lib

    config = _vitb16_config(args)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer = train_lib.build_trainer(config, mesh)
    batch = {k: jax.device_put(np.zeros(v.shape, v.dtype), v.sharding)
             for k, v in train_lib.abstract_batch(trainer, True).items()}
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        for _ in range(2):
            state, metrics = trainer.train_step(state, batch, {})
        jax.block_until_ready(metrics)
    peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    total = predicted["bytes_per_device"]["total"]
    _emit(_line("aot_memory", case, "GiB", total / 2**30, peak / 2**30 if peak else None,
                "memory_stats()['peak_bytes_in_use'] after two steps, this device", device=kind, grain=grain,
                predicted_bytes=predicted["bytes_per_device"], measured_peak_bytes=peak, backend=backend,
                note="speedup = predicted / measured (1.0: exact)"))


def case_aot_predict(args, grain):
    """(child of aot_memory) the train step compiled for --_target without a device; its report to --_out."""
    from harmoclip_jax import aot

    target = aot.parse_target(args._target)
    config = _vitb16_config(args)
    config.mesh = (("data", 1), ("fsdp", 1))
    report = aot.compile_config(config, target, evals=False, log=lambda line: None)["train_step"]
    pathlib.Path(args._out).write_text(json.dumps(report))


RUNNERS = {"train_step": case_train_step, "train_step_torch": case_train_step_torch, "encode": case_encode,
           "roi_align": case_roi_align, "pipeline": case_pipeline, "max_batch": case_max_batch,
           "aot_memory": case_aot_memory, "aot_predict": case_aot_predict}


# ---------------------------------------------------------------------------------------- orchestrator


def _probe_device() -> str:
    try:
        proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "unknown"
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def orchestrate(args, argv) -> int:
    began = time.perf_counter()
    device = None
    failures = 0
    train_step = None  # our train-step line, whose images/s is the "ours" of the PyTorch step's line
    cuda = _cuda()
    jobs = []
    for name in args.cases:
        if name == "max_batch" and not args.tiny:  # an OOM can leave the allocator fragmented: fresh processes
            jobs += [(name, ["--remat", "off"]), (name, ["--remat", "on"])]
        elif name == "max_batch":
            jobs.append((name, ["--remat", "both"]))
        else:
            jobs.append((name, []))
    for name, extra in jobs:
        bound = BOUNDS[name] * args.bound_scale * (2 if "both" in extra else 1)
        remaining = args.budget_s - (time.perf_counter() - began)
        timeout = min(bound, remaining)
        label = {"bench": name, "case": {"options": extra}, "unit": None, "ours": None, "reference": None,
                 "reference_name": None, "speedup": None}
        if name in CUDA_ONLY and not cuda:
            _emit({**label, "case": {"variant": args.variant, "batch": args.batch, "boxes_per_image": args.boxes},
                   "cpu": _cpu(), "device": device, "skipped": "no CUDA"})
            continue
        if timeout < 5:
            failures += 1
            _emit({**label, "cpu": _cpu(), "device": device,
                   "error": "not run: under 5 s left of its bound or of the suite's --budget_s"})
            continue
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_case", name, *extra,
                   "--case_budget_s", str(max(timeout - 25 * args.bound_scale, 1)), *argv]  # start-up, margin
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if name == "max_batch":
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # search nearly all of HBM, not XLA's 75 %
        if name in ("encode", "train_step_torch", "roi_align"):
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # torch shares the GPU with JAX in those processes
        start = time.perf_counter()
        # Its own process group, so that a case cut off at its bound goes with its workers (the pipeline's pool),
        # which would otherwise hold the output pipes open.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            code, why = proc.returncode, f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            code, why = -1, f"timed out after {timeout:.0f} s (its bound)"
        seconds = time.perf_counter() - start
        lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
        for line in lines:
            device = device or line.get("device")
            line.setdefault("device", device)
            if line["bench"] == "train_step":
                train_step = line
            if line["bench"] == "train_step_torch" and line.get("reference") and train_step and train_step["ours"]:
                line.update(ours=train_step["ours"], speedup=train_step["ours"] / line["reference"],
                            ours_name="the train_step line (harmoclip_jax, same batch, same GPU)")
            line["case_seconds"] = round(seconds, 1)
            _emit(line)
        if code != 0 or not lines:
            failures += 1
            if device is None:
                device = _probe_device()
            _emit({**label, "cpu": _cpu(), "device": device, "error": why, "case_seconds": round(seconds, 1),
                   "stderr_tail": stderr[-1500:]})
            sys.stderr.write(f"--- {name} {extra}: {why}\n{stderr[-4000:]}\n")
        else:
            sys.stderr.write(f"--- {name} {extra}: ok in {seconds:.0f} s\n{stderr[-1500:]}\n")
    sys.stderr.write(f"accelerator suite: {len(jobs)} case runs, {failures} failed, "
                     f"{time.perf_counter() - began:.0f} s\n")
    return 1 if failures else 0


def _cpu():
    from harmoclip_jax.testing.machine import cpu_description

    return cpu_description()


TINY = {"variant": "test-tiny", "size": 64, "batch": 2, "boxes": 3, "steps": 1, "matmul_n": 256,
        "search_batches": "2,4", "simulate_oom_above": 2, "encode_iters": 1, "roi_iters": 2, "pipeline_images": 8,
        "pipeline_source": "96x64", "pipeline_window_s": 0.5, "budget_s": 420, "bound_scale": 1.5}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU test sizes (test-tiny model, batch 2, 3 boxes)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--variant", default="ViT-B/16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (after one warm-up)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--matmul_n", type=int, default=8192, help="size of the peak-measuring matmul")
    parser.add_argument("--search_batches", default="512,1024,2048,4096,8192,16384",
                        help="ascending; doubling reaches the OOM within the time bound (each try compiles anew)")
    parser.add_argument("--encode_iters", type=int, default=10)
    parser.add_argument("--roi_iters", type=int, default=50)
    parser.add_argument("--pipeline", choices=["auto", "grain", "pool"], default="auto")
    parser.add_argument("--pipeline_images", type=int, default=256)
    parser.add_argument("--pipeline_source", default="640x480", help="WxH of the synthetic JPEGs")
    parser.add_argument("--pipeline_window_s", type=float, default=8.0)
    parser.add_argument("--budget_s", type=float, default=450, help="the whole suite's time bound (seconds)")
    parser.add_argument("--bound_scale", type=float, default=1.0, help="scales every case's time bound")
    parser.add_argument("--_case", choices=(*CASES, "aot_predict"), help=argparse.SUPPRESS)
    parser.add_argument("--_target", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--remat", choices=["off", "on", "both"], default="off", help=argparse.SUPPRESS)
    parser.add_argument("--simulate_oom_above", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--case_budget_s", type=float, default=100, help=argparse.SUPPRESS)
    if "--tiny" in argv:
        parser.set_defaults(**TINY)
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    args.search_batches = [int(x) for x in str(args.search_batches).split(",")]
    args.pipeline_source = [int(x) for x in str(args.pipeline_source).split("x")]
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args._case:
        grain = _setup()
        RUNNERS[args._case](args, grain)
        return 0
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())
