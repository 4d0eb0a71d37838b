"""What the chips we train on can do, and how much work one train step is.

`CHIPS` holds the datasheet figures a roofline needs (memory, peak matmul rate, HBM and interconnect bandwidth), each
with its source; `chip_for(device_kind)` finds a chip from `jax.Device.device_kind` ("TPU v5 lite", "NVIDIA H100 80GB
HBM3", ...). `model_flops_per_image` is the analytic count of one train step's model FLOPs per image (the MFU
convention: what the model needs, not what the compiler ran, so rematerialisation is not counted); the trainer logs
TFLOP/s and MFU from it, and `python -m harmoclip_jax.aot` sets XLA's own count beside it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax

GB = 1e9
GiB = 2**30
TB = 1e12


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    memory_bytes: float  # HBM per chip
    peak_bf16: float  # dense bf16 matmul FLOP/s per chip
    peak_f32: float  # FLOP/s of a float32 matmul at JAX's default precision (TPU: one bf16 pass; GPU: TF32)
    hbm_bandwidth: float  # bytes/s per chip
    interconnect_bandwidth: float  # bytes/s per chip, one direction (ICI on TPU, NVLink within a GPU host)
    cross_host_bandwidth: float | None  # bytes/s per chip between hosts (GPU: InfiniBand); None: ICI spans hosts
    kind_pattern: str  # regex on jax.Device.device_kind
    source: str

    def peak(self, dtype: str) -> float:
        return self.peak_bf16 if dtype in ("bfloat16", "float16") else self.peak_f32


_TPU_DOCS = "https://cloud.google.com/tpu/docs/"
_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (SXM column: dense figures are half the sparsity ones)"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (SXM column)"
# DGX H100/H200: one 400 Gb/s ConnectX-7 InfiniBand port per GPU between hosts.
_IB_PER_GPU = 400e9 / 8

# Interconnect: Cloud TPU pages give ICI per chip in Gbps one way (v4 2,400, v5e 1,600, v5p 4,800) or GB/s both ways
# (v5e 400, v6e 800); NVLink 4 is 900 GB/s both ways per GPU.
CHIPS: dict[str, Chip] = {chip.name: chip for chip in (
    Chip("v4", 32 * GiB, 275 * TB, 275 * TB, 1200 * GB, 2400e9 / 8, None, r"TPU v4", _TPU_DOCS + "v4"),
    Chip("v5e", 16 * GiB, 197 * TB, 197 * TB, 819 * GB, 1600e9 / 8, None, r"TPU v5 ?lite|TPU v5e",
         _TPU_DOCS + "v5e"),
    Chip("v5p", 95 * GiB, 459 * TB, 459 * TB, 2765 * GB, 4800e9 / 8, None, r"TPU v5p?$", _TPU_DOCS + "v5p"),
    Chip("v6e", 32 * GiB, 918 * TB, 918 * TB, 1638 * GB, 800 * GB / 2, None, r"TPU v6 ?lite|TPU v6e",
         _TPU_DOCS + "v6e"),
    # H100 SXM: the memory its XLA device description reports (80 GB); H200: the datasheet's 141 GB.
    Chip("h100", 84_942_979_072, 989 * TB, 494.5 * TB, 3350 * GB, 900 * GB / 2, _IB_PER_GPU, r"H100", _H100),
    Chip("h200", 141 * GB, 989 * TB, 494.5 * TB, 4800 * GB, 900 * GB / 2, _IB_PER_GPU, r"H200", _H200),
)}


def chip_for(device_kind: str) -> Chip | None:
    """The chip of a `jax.Device.device_kind`, or None for one we have no figures for (CPUs included)."""
    for chip in CHIPS.values():
        if re.search(chip.kind_pattern, device_kind):
            return chip
    return None


# ------------------------------------------------------------------------------------------- analytic FLOPs


def _tower_forward_flops(params: dict[str, Any], tokens: int, *, patches: int = 0, head_tokens: int = 1,
                         dense: bool = False) -> float:
    """Forward FLOPs of one transformer tower on one sequence of `tokens`, from its parameter shapes: every block
    matmul on every token, attention's two (tokens x tokens) matmuls per block, the patch embedding on `patches`
    patches and the other matrices (projection, pooling head) on `head_tokens` tokens. `dense`: the last block's
    patches take the value path (no attention) and only the first token attends (`models/clip.py`, `Block.dense`)."""
    blocks: dict[str, float] = {}  # block id -> matmul parameters
    width, head, embed = 0, 0.0, 0.0
    for path, leaf in params.items():
        shape = tuple(leaf.shape)
        if len(shape) < 2:
            continue
        block = re.search(r"(?:blocks|layers)/(\d+)/", path)
        if block:
            blocks[block.group(1)] = blocks.get(block.group(1), 0.0) + math.prod(shape)
            if re.search(r"qkv/kernel$", path):
                width = shape[0]
        elif "patch_embed" in path and len(shape) == 4:
            embed += 2.0 * patches * math.prod(shape)
        elif re.search(r"(pos|token)\w*embed|embedding$", path):
            continue  # added or gathered, not multiplied
        else:
            head += math.prod(shape)
    layers = len(blocks)
    per_block = sum(blocks.values()) / max(layers, 1)
    attending = (layers - 1) * tokens + 1 if dense else layers * tokens  # queries, summed over the blocks
    flops = 2.0 * tokens * per_block * layers + 4.0 * attending * tokens * width + embed
    return flops + 2.0 * head * head_tokens


def model_flops_per_image(trainer, batch: dict) -> float:
    """Model FLOPs of one train step per image (`train.Trainer`, and `batch` the step's global batch of arrays or
    ShapeDtypeStructs, `train.abstract_batch`): 3x the forward of what trains (the backward does two matmuls per
    forward one), 1x the forward of frozen passes (the teacher, a frozen text tower), as `losses.required_outputs`
    asks for them. Text embeddings cached from a frozen tower cost nothing in the step."""
    from flax import traverse_util

    config, glue = trainer.config, trainer.glue
    flat = {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(glue.abstract_params).items()}

    def tower(name):
        return {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + "/")}

    image, text = tower(glue.image_tower), tower(glue.backbone.text_tower)
    vision = glue.config.vision
    patches = (vision.image_size // vision.patch_size) ** 2
    pos = [v.shape[0] for k, v in image.items() if re.search(r"pos\w*embed", k) and len(v.shape) == 2]
    tokens = pos[0] if pos else patches  # patches plus the class token where the family has one
    needed, batch_size = trainer.needed, int(config.batch_size)

    def image_pass(dense: bool) -> float:
        return _tower_forward_flops(image, tokens, patches=patches, head_tokens=tokens if dense else 1, dense=dense)

    flops = 0.0
    dense = "region_embed" in needed
    if dense or "image_embed" in needed:
        flops += 3.0 * image_pass(dense)
    regions = int(config.data.max_regions)
    if "crop_embed" in needed:
        flops += 3.0 * regions * image_pass(False)
    if "teacher_crop_embed" in needed:
        flops += regions * image_pass(False)
    if "teacher_region_embed" in needed:
        flops += image_pass(True)
    text_factor = 1.0 if trainer.text_frozen else 3.0
    for key in ("text", "region_text", "lexeme"):  # token rows the step encodes (not cached embeddings)
        rows = batch.get(f"{key}_table", batch.get(key))
        if rows is None:
            continue
        shape = tuple(rows.shape)
        sequences, length = math.prod(shape[:-1]), shape[-1]
        per_token = any(k.startswith(key) and k.endswith("token_embed") for k in needed)
        flops += text_factor * sequences * _tower_forward_flops(text, length, head_tokens=length if per_token else 1
                                                                ) / batch_size
    return flops


def device_chip() -> Chip | None:
    """The chip this process trains on, or None (CPU, or a kind not in `CHIPS`)."""
    device = jax.devices()[0]
    return chip_for(device.device_kind) if device.platform in ("tpu", "gpu") else None
