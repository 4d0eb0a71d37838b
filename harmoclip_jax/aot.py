"""Will it fit, and how fast can it be? Compile a config's programs for a TPU slice or a GPU node on any machine.

    python -m harmoclip_jax.aot --config=configs/vitb16.py --target=tpu:v5e:4x4
    python -m harmoclip_jax.aot --config=configs/eva02_l14_336.py:dtype=bfloat16 --target=gpu:h100:1x1x8 --max_batch
    python -m harmoclip_jax.aot --config=configs/vitb16.py --target=tpu:v5e:16x16 --num_slices=2 --json=out.json

Builds what `main` runs (the same trainer, mesh, sharding rules and donated state; the jitted train step and the
evaluators' jitted encoders) from abstract values, with no weights, no data and nothing allocated, compiles them for
the target's devices (`jax.experimental.topologies`: libtpu and the CUDA PJRT plugin compile without a chip;
`pip install -r requirements-aot.txt`), and reports per device: memory against the chip's, XLA's FLOPs beside the
analytic model FLOPs, collective traffic, and the roofline step time those imply (`accelerators.CHIPS`). GPU
compiles use cuBLAS for matmuls (`--xla_gpu_enable_triton_gemm=false`): without a device XLA cannot autotune
Triton's tilings and its default ones fail on ViT shapes; memory is exact, speed is the roofline's bound.

Targets: `tpu:CHIP:TOPOLOGY` (v4, v5e, v5p, v6e; the topology as Cloud TPU names it: 4x4, 2x2x2, ...) and
`gpu:CHIP:SxHxG` (h100, h200; slices x hosts per slice x GPUs per host).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

from harmoclip_jax import accelerators

# What libtpu reads when it loads: compiling needs no chip, so no metadata server, no TPU workers to find and no
# lock on the (absent) device. Set only while the topology is built: left in os.environ, JAX's cluster detection in
# any child process (a test's trainer run) would take the machine for a TPU VM.
_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

GiB = 2**30
AOT_INSTALL = "pip install -r requirements-aot.txt"
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
GPU_CHIPS = ("h100", "h200")
TARGET_EXAMPLES = ("tpu:v5e:4x4", "tpu:v5p:2x2x2", "tpu:v6e:4x4", "tpu:v4:2x2x2", "tpu:v5e:16x16",
                   "gpu:h100:1x1x8", "gpu:h200:2x1x8")
# Compiler options per platform: see the module docstring (GPU) and docs/accelerators.md.
COMPILER_OPTIONS = {"gpu": {"xla_gpu_enable_triton_gemm": False}, "tpu": {}}


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str  # "tpu" | "gpu"
    chip: accelerators.Chip
    topology: str
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.platform}:{self.chip.name}:{self.topology}" + \
            (f" x {self.num_slices} slices" if self.num_slices > 1 else "")


def parse_target(spec: str, num_slices: int = 1) -> Target:
    """`tpu:v5e:4x4` / `gpu:h100:1x1x8` -> Target; one-line ValueError naming the known forms otherwise."""
    known = f"known chips: tpu {', '.join(TPU_CHIPS)}; gpu {', '.join(GPU_CHIPS)}; e.g. {', '.join(TARGET_EXAMPLES)}"
    parts = spec.strip().lower().split(":")
    if len(parts) != 3:
        raise ValueError(f"--target={spec!r}: use PLATFORM:CHIP:TOPOLOGY ({known})")
    platform, chip, topology = parts
    chips = {"tpu": TPU_CHIPS, "gpu": GPU_CHIPS}.get(platform)
    if chips is None or chip not in chips:
        raise ValueError(f"--target={spec!r}: unknown {'chip' if chips else 'platform'} ({known})")
    dims = topology.split("x")
    if not all(d.isdigit() and int(d) > 0 for d in dims) or len(dims) not in ((2, 3) if platform == "tpu" else (3,)):
        form = "AxB or AxBxC chips, as Cloud TPU names the slice" if platform == "tpu" else \
            "SLICESxHOSTSxGPUS, e.g. 1x1x8 (one host of 8)"
        raise ValueError(f"--target={spec!r}: topology {topology!r} is not {form}")
    if num_slices < 1 or (num_slices > 1 and platform != "tpu"):
        raise ValueError(f"--num_slices={num_slices}: a positive number of TPU slices (GPU targets give slices in "
                         "their topology: SLICESxHOSTSxGPUS)")
    return Target(platform, accelerators.CHIPS[chip], topology, num_slices)


def _gpu_target_config(chip: accelerators.Chip) -> str:
    """XLA's GPU device description (`stream_executor.GpuTargetConfigProto` text) of an SXM Hopper GPU of `chip`'s
    memory and bandwidth: what the compiler reads instead of querying a device (sm_90a, 132 SMs)."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {int(chip.memory_bytes)} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation" platform_version: "Compute Capability 9.0a" device_address_bits: 64
  pcie_bandwidth: 34359738368 ecc_enabled: true name: "NVIDIA {chip.name.upper()}"
  driver_version: "13.0.0" runtime_version: "12.9.0" compile_time_toolkit_version: "12.9.0"
  dnn_version: "9.10.0" cub_version: "3.1.2" device_interconnect_info {{ active_links: 18 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "NVIDIA {chip.name.upper()}"
"""


def target_devices(target: Target) -> list:
    """The target's devices (one per chip), for meshes and shardings; nothing runs on them."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # compile for the target; never open a local TPU/GPU
    # Deviceless executables cannot be loaded back from jax's persistent cache: don't write them there.
    jax.config.update("jax_enable_compilation_cache", False)
    from jax.experimental import topologies

    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise RuntimeError(f"compiling for TPUs needs libtpu: {AOT_INSTALL}")
        kwargs = {"chip_config_name": "megacore"} if target.chip.name == "v4" else {}  # one device per v4 chip
        if target.num_slices > 1:
            kwargs["num_slices"] = target.num_slices
        saved = {k: os.environ.get(k) for k in _LIBTPU_ENV}
        os.environ.update({k: v for k, v in _LIBTPU_ENV.items() if saved[k] is None})
        try:
            topo = topologies.get_topology_desc(topology_name=f"{target.chip.name}:{target.topology}",
                                                platform="tpu", **kwargs)
        except Exception as error:  # noqa: BLE001 - libtpu's refusal, e.g. a shape the chip has no slice of
            raise ValueError(f"--target={target.name}: libtpu has no such topology ({str(error).splitlines()[0]})"
                             ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
    else:
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
            raise RuntimeError(f"compiling for GPUs needs the CUDA PJRT plugin: {AOT_INSTALL}")
        topo = topologies.get_topology_desc(platform="cuda", target_config=_gpu_target_config(target.chip),
                                            topology=target.topology)
    return list(topo.devices)


# ------------------------------------------------------------------------------------------- analysis


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start)?\(")


def _shape_bytes(text: str) -> list[int]:
    return [_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(text)]


def _group_size(line: str, default: int) -> int:
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    groups = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if groups:
        return len(groups.group(1).split(","))
    return default


def collective_bytes(hlo: str, devices: int) -> dict[str, float]:
    """Bytes each device sends per step, by collective kind, from the optimised HLO (ring algorithms: an all-reduce
    of S bytes over n devices sends 2 S (n-1)/n, an all-gather to S sends S (n-1)/n, a reduce-scatter to S sends
    S (n-1)); `"total"` sums them."""
    out: dict[str, float] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shapes, kind, start = _shape_bytes(m.group(1)), m.group(2), m.group(3)
        if not shapes:
            continue
        size = shapes[-1] if start and kind == "all-gather" else sum(shapes)  # -start: (operands, result) tuple
        if start and kind == "all-reduce":
            size = sum(shapes)
        n = _group_size(line, devices)
        if n <= 1:
            continue
        wire = {"all-reduce": 2 * size * (n - 1) / n, "all-gather": size * (n - 1) / n,
                "reduce-scatter": size * (n - 1), "all-to-all": size * (n - 1) / n,
                "collective-permute": size}[kind]
        out[kind] = out.get(kind, 0.0) + wire
    out["total"] = sum(out.values())
    return out


_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\(?\s*([a-z0-9]+)\[([0-9,]*)\]")


def cublas_flops(hlo: str) -> float:
    """2 x |output| x |contracted| of every cuBLAS GEMM in optimised GPU HLO (XLA's cost analysis counts custom calls
    as zero FLOPs)."""
    dims = {m.group(1): [int(d) for d in m.group(3).split(",") if d]
            for m in map(_DEFINITION.match, hlo.splitlines()) if m}
    total = 0.0
    for line in hlo.splitlines():
        if 'custom_call_target="__cublas$' not in line or "backend_config" not in line:
            continue
        head = _DEFINITION.match(line)
        operands = re.search(r"custom-call\(([^)]*)\)", line)
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
        lhs = operands.group(1).split(",")[0].strip().split()[-1].lstrip("%") if operands else ""
        if not (head and contracting and lhs in dims):
            raise ValueError(f"cannot read a cuBLAS call's shapes from the HLO: {line[:300]}")
        k = math.prod(dims[lhs][int(i.strip().strip('"'))] for i in contracting.group(1).split(",") if i.strip())
        total += 2.0 * math.prod(int(d) for d in head.group(3).split(",") if d) * k
    return total


def analyse(compiled, target: Target, devices: int) -> dict[str, Any]:
    """Memory per device, XLA's FLOPs and bytes per device and collective traffic of a compiled program."""
    import jax

    mem = compiled.memory_analysis()
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temps = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total = args + outs - alias + temps + mem.generated_code_size_in_bytes
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    else:  # the deviceless GPU executable has no cost analysis: XLA's HloCostAnalysis of its optimised module
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
        flops, accessed = float(cost["flops"]) + cublas_flops(hlo), float(cost["bytes accessed"])
    return {
        "bytes_per_device": {"arguments": int(args), "outputs": int(outs), "aliased": int(alias),
                             "temporaries": int(temps), "code": int(mem.generated_code_size_in_bytes),
                             "total": int(total)},
        "device_memory_bytes": int(target.chip.memory_bytes),
        "fits": bool(total <= target.chip.memory_bytes),
        "xla_flops_per_device": flops,
        "xla_bytes_accessed_per_device": accessed,
        "collective_bytes_per_device": collective_bytes(hlo, devices),
        # Library kernels the program calls (cuBLAS GEMMs, cuDNN attention, ...): which implementation was chosen.
        "custom_calls": sorted({m.group(1) for m in re.finditer(r'custom_call_target="([^"]+)"', hlo)}),
    }


def roofline(report: dict, target: Target, dtype: str, hosts: int) -> dict[str, Any]:
    """The step time below which the chip cannot go: compute at peak, HBM traffic at full bandwidth, collectives at
    the interconnect's rate (cross-host GPU traffic at InfiniBand's), whichever is longest."""
    chip = target.chip
    link = chip.interconnect_bandwidth if hosts == 1 or chip.cross_host_bandwidth is None \
        else chip.cross_host_bandwidth
    # XLA counts a loop body once: the ring losses' pair scores come from the analytic count where that is larger
    analytic = (report.get("analytic_flops_per_device") or 0) + report.get("analytic_loss_flops_per_device", 0)
    bounds = {"compute_s": max(report["xla_flops_per_device"], analytic) / chip.peak(dtype),
              "memory_s": report["xla_bytes_accessed_per_device"] / chip.hbm_bandwidth,
              "collectives_s": report["collective_bytes_per_device"]["total"] / link}
    step = max(bounds.values())
    out = {"roofline_step_s": step, "roofline_bound": max(bounds, key=bounds.get).removesuffix("_s"),
           "roofline": bounds, "peak_flops_per_device": chip.peak(dtype)}
    if report.get("analytic_flops_per_device"):
        out["mfu_at_roofline"] = report["analytic_flops_per_device"] / step / chip.peak(dtype)
    return out


# ------------------------------------------------------------------------------------------- programs


def _hosts(target: Target, devices: list) -> int:
    return len({getattr(d, "process_index", 0) for d in devices}) or 1


def _eval_programs(trainer) -> dict[str, tuple]:
    """(jitted fn, abstract args) of each configured evaluator's encoders at config.eval_batch_size."""
    import jax
    import jax.numpy as jnp

    config = trainer.config
    fns = trainer.eval_fns()
    p = trainer.abstract_state["params"]
    b_sh = trainer.batch_sharding
    e, s = int(config.eval_batch_size), config.model.image_size
    img_dtype = jnp.uint8 if config.data.get("image_dtype", "float32") == "uint8" else jnp.float32
    images = jax.ShapeDtypeStruct((e, s, s, 3), img_dtype, sharding=b_sh)
    programs = {}
    for name, ev in config.evals.items():
        kind = ev.type
        if kind == "retrieval":
            captions = jax.ShapeDtypeStruct((e, int(config.data.get("eval_captions", 5)), config.model.context_length),
                                            jnp.int32, sharding=b_sh)
            programs[f"{name}/encode_images"] = (fns.encode_images, (p, images))
            programs[f"{name}/encode_captions"] = (fns.encode_captions, (p, captions))
        elif kind == "box_classification":
            t = int(ev.get("max_regions") or config.data.eval_max_regions)
            boxes = jax.ShapeDtypeStruct((e, t, 4), jnp.float32, sharding=b_sh)
            programs[f"{name}/encode_regions"] = (fns.encode_regions, (p, images, boxes))
        elif kind == "segmentation":
            programs[f"{name}/encode_dense"] = (fns.encode_dense, (p, images))
    return programs


def compile_config(config, target: Target, *, evals: bool = True, devices: list | None = None,
                   log=print) -> dict[str, Any]:
    """Compiles the train step (and, with `evals`, each evaluator's encoders) of `config` for `target`; one report
    per program (see the module docstring; `--json` writes them)."""
    import jax

    from harmoclip_jax import losses, sharding, train
    from harmoclip_jax.models import clip

    devices = devices or target_devices(target)
    n = len(devices)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    trainer = train.build_trainer(config, mesh)
    hosts = _hosts(target, devices)
    cache_active = bool(config.text_cache.enabled and trainer.text_frozen)
    batch = train.abstract_batch(trainer, cache_active)
    consts = train.abstract_consts(trainer, cache_active)
    state = trainer.abstract_state
    common = {"target": target.name, "devices": n, "hosts": hosts, "mesh": dict(mesh.shape),
              "dtype": config.model.dtype, "remat": bool(config.model.remat),
              "grad_accum_steps": int(config.optim.grad_accum_steps)}
    accum = common["grad_accum_steps"]
    microbatch = config.batch_size // accum
    with jax.set_mesh(mesh):  # the loss terms' form for this mesh and microbatch (recorded with the numbers)
        common["contrastive_form"] = losses.contrastive_form(microbatch)
    analytic = accelerators.model_flops_per_image(trainer, batch) * config.batch_size / n
    loss_flops = accum * losses.pairwise_score_flops(config.loss, microbatch, int(config.data.max_regions),
                                                     trainer.glue.config.embed_dim, common["contrastive_form"]) / n
    programs = {"train_step": (trainer.train_step, (state, batch, consts), config.batch_size, analytic)}
    if evals:
        for name, (fn, args) in _eval_programs(trainer).items():
            programs[name] = (fn, args, int(config.eval_batch_size), None)
    reports = {}
    for name, (fn, args, global_batch, analytic_flops) in programs.items():
        start = time.perf_counter()
        with jax.set_mesh(mesh), clip.attention_platform(target.platform):
            lowered = fn.lower(*args)
            try:
                compiled = lowered.compile(compiler_options=COMPILER_OPTIONS[target.platform])
            except Exception as error:  # noqa: BLE001 - XLA's refusal: out of memory on a TPU, or a bug
                text = str(error).splitlines()[0] if str(error) else type(error).__name__
                if "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error):
                    reports[name] = {**common, "global_batch": global_batch, "fits": False,
                                     "device_memory_bytes": int(target.chip.memory_bytes),
                                     "compile_error": text[:500], "compile_s": time.perf_counter() - start}
                    log(f"{name}: does not fit on {target.name} ({text[:200]})")
                    continue
                raise ValueError(f"{name} of {config.model.variant} does not compile for {target.name}: {text}"
                                 ) from error
        report = {**common, "global_batch": global_batch, **analyse(compiled, target, n),
                  "compile_s": time.perf_counter() - start}
        report["analytic_flops_per_device"] = analytic_flops
        if name == "train_step":
            report["analytic_loss_flops_per_device"] = loss_flops
        report.update(roofline(report, target, config.model.dtype, hosts))
        report["images_per_s_per_device_bound"] = global_batch / n / report["roofline_step_s"]
        reports[name] = report
        log(summary_line(name, report))
    return reports


def summary_line(name: str, r: dict) -> str:
    total, cap = r["bytes_per_device"]["total"] / GiB, r["device_memory_bytes"] / GiB
    fit = f"fits, {total:.1f} of {cap:.0f} GiB" if r["fits"] else f"short by {total - cap:.1f} GiB ({total:.1f} " \
        f"of {cap:.0f})"
    flops = f"{r['xla_flops_per_device'] / 1e12:.2f} TFLOP/device"
    if r.get("analytic_flops_per_device"):
        loss = r.get("analytic_loss_flops_per_device", 0)
        flops += f" (analytic {r['analytic_flops_per_device'] / 1e12:.2f}" + \
            (f" + {loss / 1e12:.2f} in the loss's pair scores)" if loss > 0.01 * r["analytic_flops_per_device"] else ")")
    line = (f"{name}: batch {r['global_batch']} on {r['target']}: {fit}; {flops}; roofline "
            f"{r['roofline_step_s'] * 1e3:.1f} ms ({r['roofline_bound']}-bound), "
            f"{r['images_per_s_per_device_bound']:.0f} img/s/device")
    if r.get("mfu_at_roofline") is not None:
        line += f", MFU {100 * r['mfu_at_roofline']:.0f}% at the bound"
    return line + f"; compiled in {r['compile_s']:.0f} s"


def _with(config, **fields):
    import ml_collections

    copy = ml_collections.ConfigDict(config.to_dict())
    for key, value in fields.items():
        node = copy
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return copy


def largest_fitting(fits, start: int, step: int, precision: float = 1 / 8, limit: int = 2**20
                    ) -> tuple[int, int | None, dict[int, bool]]:
    """Bisection over batch sizes (multiples of `step`) for the largest one that `fits(batch)`: doubling from
    `start` until one fails (or halving until one fits), then bisecting until the failing one is within
    `precision` of the fitting one (precision >= 1: doubling only, so the answer fits and its double does not).
    Returns (largest fitting or 0, smallest failing or None, {batch: fits} of every trial)."""
    trials: dict[int, bool] = {}

    def trial(batch: int) -> bool:
        if batch not in trials:
            trials[batch] = bool(fits(batch))
        return trials[batch]

    lo, hi, batch = 0, None, max(step, start // step * step)
    while hi is None and batch <= limit:
        if trial(batch):
            lo, batch = batch, batch * 2
        else:
            hi = batch
    while lo == 0 and hi is not None and hi > step:
        batch = max(step, hi // 2 // step * step)
        if trial(batch):
            lo = batch
        else:
            hi = batch
    while lo and hi is not None and hi - lo > max(step, lo * precision):
        mid = (lo + hi) // 2 // step * step
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if trial(mid) else (lo, mid)
    return lo, hi, trials


def linear_guess(totals: dict[int, int], capacity: int, step: int) -> int | None:
    """The largest multiple of `step` whose memory a line through two measured (batch, bytes per device) points keeps
    within `capacity`, or None without two distinct points. Per-device memory is the replicated state plus
    per-example activations, so a line fits it closely; `max_batch` checks the guess with two compiles."""
    points = sorted(totals.items())
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None
    (b0, t0), (b1, t1) = points[0], points[-1]
    per_example = (t1 - t0) / (b1 - b0)
    return max(0, int((capacity - (t0 - per_example * b0)) / per_example) // step * step)


def max_batch(config, target: Target, *, devices: list | None = None, remats=(False, True),
              precision: float = 1 / 8, log=print, compiled: dict | None = None) -> dict[str, Any]:
    """The largest global batch (a multiple of the data-parallel size) whose train step fits, with and without
    remat (`remats`), and the setting it recommends. Compiles the protocol batch and half of it, extrapolates their
    memory to the chip's capacity (`linear_guess`), and checks the guess: it fits and one step of `precision` more
    does not (four compiles). Where a check fails, or a compile cannot say its memory (a TPU refuses what does not
    fit), bisection over compiles (`largest_fitting`) finishes from what is known. `compiled`: the train step's
    report of `config` itself (`compile_config`), when the caller has it: that trial is not compiled again."""
    devices = devices or target_devices(target)
    n = len(devices)
    results: dict[str, Any] = {}
    for remat in remats:
        trials: dict[int, bool] = {}
        totals: dict[int, int] = {}
        if (compiled is not None and bool(config.model.remat) == remat and config.optim.grad_accum_steps == 1
                and config.batch_size % n == 0):  # the same program as the trial of config.batch_size
            used = compiled.get("bytes_per_device", {}).get("total")
            trials[config.batch_size] = bool(used <= target.chip.memory_bytes) if used else bool(compiled["fits"])
            if used:
                totals[config.batch_size] = used

        def fits(batch: int) -> bool:
            if batch not in trials:
                trial = _with(config, batch_size=batch, eval_batch_size=n, **{"model.remat": remat,
                                                                               "optim.grad_accum_steps": 1})
                report = compile_config(trial, target, evals=False, devices=devices, log=lambda s: None)["train_step"]
                used = report.get("bytes_per_device", {}).get("total")
                if used:
                    totals[batch] = used
                trials[batch] = bool(report["fits"])
                log(f"  batch {batch}, remat={remat}: {'fits' if report['fits'] else 'does not fit'}"
                    + (f" ({used / GiB:.1f} GiB)" if used else ""))
            return trials[batch]

        protocol = max(n, config.batch_size // n * n)
        fits(protocol)
        fits(max(n, protocol // 2 // n * n) if protocol > n else 2 * n)
        guess = linear_guess(totals, target.chip.memory_bytes, n)
        lo = hi = None
        if guess:
            above = guess + max(n, int(guess * precision) // n * n)
            if fits(guess) and not fits(above):
                lo, hi = guess, above
        if lo is None:
            fitting = [b for b, ok in trials.items() if ok]
            lo, hi, _ = largest_fitting(fits, max(fitting) if fitting else protocol, n, precision)
        results["remat" if remat else "no_remat"] = {"largest_fitting": lo, "smallest_failing": hi,
                                                     "trials": {str(k): v for k, v in sorted(trials.items())}}
    protocol = config.batch_size
    plain = results.get("no_remat", {}).get("largest_fitting", 0)
    rematted = results.get("remat", {}).get("largest_fitting", 0)
    if plain >= protocol:
        advice = f"batch {protocol} fits without remat (up to {plain})"
    elif rematted >= protocol:
        advice = f"batch {protocol} needs remat: --config.model.remat=True (up to {rematted} with it)"
    elif rematted or plain:
        best, flag = (rematted, " --config.model.remat=True") if rematted >= plain else (plain, "")
        accum = next((a for a in range(2, protocol + 1) if protocol % (a * n) == 0 and protocol // a <= best), None)
        advice = f"batch {protocol} does not fit (largest {best}); " + (
            f"accumulate:{flag} --config.optim.grad_accum_steps={accum}" if accum else "use a bigger slice")
    else:
        advice = "one example per device does not fit: use a bigger slice, bfloat16 or fsdp"
    results["recommendation"] = advice
    return results


# ------------------------------------------------------------------------------------------- command line


def _define_flags() -> None:
    from absl import flags

    from harmoclip_jax import config_lib

    flags.DEFINE_string("target", None, f"PLATFORM:CHIP:TOPOLOGY, e.g. {', '.join(TARGET_EXAMPLES)}")
    flags.DEFINE_integer("num_slices", 1, "TPU slices joined over the data-centre network (multislice).")
    flags.DEFINE_bool("max_batch", False, "Also find the largest global batch that fits (with and without remat).")
    flags.DEFINE_bool("evals", True, "Also compile the evaluators' encoders at config.eval_batch_size.")
    flags.DEFINE_string("json", None, "Write the reports to this file as one JSON object.")
    config_lib.define_config_flag("config", None, "Experiment config file[:arguments].")


def main(argv) -> None:
    from absl import flags

    from harmoclip_jax import cli

    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are --config, --target, --num_slices, "
                             "--max_batch, --json")
    values = flags.FLAGS
    if values.config is None or values.target is None:
        raise cli.UsageError("give --config=FILE[:ARGS] and --target=PLATFORM:CHIP:TOPOLOGY, e.g. "
                             "--config=configs/vitb16.py --target=tpu:v5e:4x4")
    target = parse_target(values.target, values.num_slices)
    try:
        devices = target_devices(target)
    except RuntimeError as error:
        raise cli.Error(str(error)) from None
    config = values.config
    out: dict[str, Any] = {"config": values["config"].config_filename, "target": target.name,
                           "chip": dataclasses.asdict(target.chip)}
    print(f"compiling {values['config'].config_filename} for {target.name} ({len(devices)} devices)", flush=True)
    out["programs"] = compile_config(config, target, evals=values.evals, devices=devices)
    if values.max_batch:
        print("largest batch (train step):", flush=True)
        out["max_batch"] = max_batch(config, target, devices=devices, compiled=out["programs"]["train_step"])
        print(out["max_batch"]["recommendation"], flush=True)
    if values.json:
        with open(values.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {values.json}", flush=True)


if __name__ == "__main__":
    from harmoclip_jax import cli

    cli.run_absl(main, define_flags=_define_flags)
    sys.exit(0)
