"""HarmoCLIP train step: ours (one jitted step) vs a PyTorch reference of the same model and losses, in one run.

    python benchmarks/train_step.py [--batch 8] [--boxes 20] [--steps 2] [--rounds 3] [--variant ViT-B/16]
    python benchmarks/train_step.py --family eva02_clip --variant EVA02-B/16 --skip_reference   # any family, ours

Both sides do the same work per step, the FineCLIP COCO protocol's: text tower frozen, so caption / region-caption /
lexeme embeddings come precomputed (our trainer's text cache; FineCLIP would run the frozen tower under no_grad);
vision forward with the dense last block (value path for patch tokens, full attention for the class token);
RoIAlign (1x1 output, FineCLIP) of the boxes; GC + LRC + GR-a losses; backward through the vision tower; AdamW
(lr 1e-5, betas (0.9, 0.98), eps 1e-6, wd 0.1) on vision + logit_scale. Random weights (timing only).

The reference is transformers' CLIPModel (harmoclip_jax.testing.reference.hf_clip_model) with the dense last block
written from its modules, RoIAlign as bilinear `grid_sample` at 7x7 points per box averaged (torchvision's
roi_align cannot load against this CPU torch build), and the losses written in torch.

Prints one JSON object per case (the benchmark format of benchmarks/RESULTS.md). The two steps and the matmul peaks
are timed in interleaved rounds and each side's best round counts (the machines drift). Extra fields: seconds per
step, XLA's flop count of our step, the MFU against a peak (--peak_gflops, default: the best 4096^3 matmul of XLA,
NumPy and PyTorch measured in the same run; `mfu_vs_xla_matmul` against XLA's alone, the definition of figures
before 2026-11-30), the reference's MFU on the same flop count, and the share of our step spent in RoIAlign +
region losses (their forward + backward timed alone).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402


def _batch(rng, b, t, size, embed):
    x0 = rng.uniform(0, size * 0.6, (b, t, 2))
    wh = rng.uniform(size * 0.05, size * 0.4, (b, t, 2))
    boxes = np.concatenate([x0, x0 + wh], -1).astype(np.float32)
    return {
        "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
        "boxes": boxes,
        "box_mask": np.ones((b, t), bool),
        "lexeme_id": rng.integers(0, 50, (b, t)).astype(np.int32),
        "text_embed": rng.normal(size=(b, embed)).astype(np.float32),
        "region_text_embed": rng.normal(size=(b, t, embed)).astype(np.float32),
        "lexeme_embed": rng.normal(size=(b, t, embed)).astype(np.float32),
    }


def _time(fn, steps):
    """Mean seconds of `steps` calls of fn (warm: the builders run it once)."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------------------------- ours


def ours(args, batch):
    """Seconds per step of our jitted train step (mean of --steps after a warm-up), XLA's flops per step, the
    seconds of RoIAlign + region losses alone, and the device's peak memory (None where not reported)."""
    step, flops, region_step, memory = build_ours(args, batch)
    seconds = _time(step, args.steps)
    return seconds, flops, _time(region_step, max(args.steps, 5)), memory()


def build_ours(args, batch):
    """Our step, compiled and warmed up: (step(), flops per step, region_step(), peak_memory_bytes())."""
    import jax
    import jax.numpy as jnp

    from harmoclip_jax import config_lib, losses, sharding, train
    from harmoclip_jax.ops.regions import region_embeddings

    c = config_lib.base_config("harmoclip")
    c.model.family = args.family
    c.model.variant = args.variant
    c.model.image_size = args.size
    c.data.max_regions = args.boxes
    c.batch_size = c.eval_batch_size = args.batch
    c.total_steps = 10_000
    c.model.dtype = args.dtype
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])
    trainer = train.build_trainer(c, mesh)
    keys = train.device_batch_keys(trainer, cache_active=True)
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        device_batch = sharding.put_batch({k: batch[k] for k in keys}, mesh)
        lowered = trainer.train_step.lower(state, device_batch, {})
        compiled = lowered.compile()
        # Flops of the HLO before backend optimisation: GPU backends hide matmuls in library calls that the
        # compiled module's cost analysis does not count.
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan")))
        holder = {"state": state}

        def step():
            holder["state"], metrics = compiled(holder["state"], device_batch, {})
            jax.block_until_ready(metrics["loss"])

        def peak_memory():
            return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

        # RoIAlign + region losses (LRC + GR-a), forward + backward w.r.t. the dense features, alone.
        grid = args.size // trainer.glue.patch_size
        embed_dim = batch["lexeme_embed"].shape[-1]
        dense = jnp.asarray(np.random.default_rng(1).normal(size=(args.batch, grid, grid, embed_dim)), jnp.float32)
        loss_config = c.loss

        def region_part(dense, b):
            regions = region_embeddings(dense, b["boxes"], stride=trainer.glue.patch_size,
                                        output_size=c.region.output_size, sampling_ratio=c.region.sampling_ratio)
            lrc = losses.lexeme_region_contrastive_loss(regions, b["lexeme_embed"], b["box_mask"], b["lexeme_id"],
                                                        jnp.log(100.0), loss_config.lrc_duplicates)
            gr = losses.region_caption_loss(regions, b["region_text_embed"], b["box_mask"], jnp.log(100.0))
            return lrc + gr

        region_grad = jax.jit(jax.value_and_grad(region_part))
        b = {k: jnp.asarray(v) for k, v in batch.items()}

        def region_step():
            jax.block_until_ready(region_grad(dense, b))

    step()  # compile-free warm-up (allocator, first-touch pages)
    region_step()
    return step, flops, region_step, peak_memory


# -------------------------------------------------------------------------------------------- reference


def reference(args, batch, device="cpu", autocast_dtype=None, info=None):
    """Seconds per step of the PyTorch reference on `device` ("cpu" or "cuda"); `autocast_dtype` (e.g.
    torch.bfloat16) runs forward + losses under torch.autocast, the usual mixed-precision recipe (params and AdamW
    stay float32). Attention is transformers' SDPA where available; `info` (a dict) gets the one used."""
    return _time(build_reference(args, batch, device, autocast_dtype, info), args.steps)


def build_reference(args, batch, device="cpu", autocast_dtype=None, info=None):
    """The PyTorch reference's step() (see `reference`), warmed up."""
    import contextlib

    from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack

    ensure_torch_reference_stack()
    import torch
    import torch.nn.functional as F

    from harmoclip_jax.testing.reference import hf_clip_model

    torch.set_num_threads(args.threads)
    model = hf_clip_model(args.variant, image_size=args.size).train()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
        except Exception:  # noqa: BLE001 - a transformers or torch without SDPA here: its default attention
            pass
    model = model.to(device)
    attention = getattr(model.config, "_attn_implementation", None)
    vm, patch = model.vision_model, model.config.vision_config.patch_size
    grid = args.size // patch
    for p in model.text_model.parameters():
        p.requires_grad_(False)
    for p in model.text_projection.parameters():
        p.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-5, betas=(0.9, 0.98), eps=1e-6)

    def encode_dense(pixels):
        hidden = vm.pre_layrnorm(vm.embeddings(pixels))
        for layer in vm.encoder.layers[:-1]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        last = vm.encoder.layers[-1]
        h = last.layer_norm1(hidden)
        cls = last.self_attn(h)[0][:, :1]  # class token attends to all tokens (HF computes every row)
        values = last.self_attn.out_proj(last.self_attn.v_proj(h[:, 1:]))  # patches: value path
        x = hidden + torch.cat([cls, values], 1)
        x = x + last.mlp(last.layer_norm2(x))
        out = model.visual_projection(vm.post_layernorm(x))
        return out[:, 0], out[:, 1:].reshape(x.shape[0], grid, grid, -1)

    def roi_pool(dense, boxes, points=7):
        """Mean of points x points bilinear samples inside each (aligned, -0.5 cell) box."""
        b, t = boxes.shape[:2]
        g = (boxes / patch) - 0.5  # grid coordinates of the box
        frac = (torch.arange(points, dtype=torch.float32, device=boxes.device) + 0.5) / points
        xs = g[..., 0:1] + frac * (g[..., 2:3] - g[..., 0:1])  # (b, t, P)
        ys = g[..., 1:2] + frac * (g[..., 3:4] - g[..., 1:2])
        gx = (xs + 0.5) / grid * 2 - 1
        gy = (ys + 0.5) / grid * 2 - 1
        sample = torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), -1)  # (b,t,P,P,2)
        feats = F.grid_sample(dense.permute(0, 3, 1, 2), sample.reshape(b, t * points, points, 2),
                              mode="bilinear", align_corners=False)
        return feats.reshape(b, -1, t, points * points).mean(-1).permute(0, 2, 1)

    def info_nce(q, k, scale, valid=None, positive=None):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        n = q.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=q.device)
        valid = torch.ones(n, dtype=torch.bool, device=q.device) if valid is None else valid
        pos = eye if positive is None else (positive | eye)
        logits = scale * q @ k.T

        def one_way(lg, ps):
            lg = lg.masked_fill(~valid[None, :], float("-inf"))
            loss = torch.logsumexp(lg, -1) - torch.logsumexp(lg.masked_fill(~ps, float("-inf")), -1)
            return (loss * valid).sum() / valid.sum().clamp(min=1)

        return (one_way(logits, pos) + one_way(logits.T, pos.T)) / 2

    tb = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    pixels = tb["image"].permute(0, 3, 1, 2).contiguous()
    autocast = (torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            image, dense = encode_dense(pixels)
            regions = roi_pool(dense.float(), tb["boxes"]).reshape(-1, dense.shape[-1])
            scale = model.logit_scale.exp()
            mask = tb["box_mask"].reshape(-1)
            ids = tb["lexeme_id"].reshape(-1)
            gc = info_nce(image, tb["text_embed"], scale)
            lrc = info_nce(regions, tb["lexeme_embed"].reshape(regions.shape), scale, mask,
                           ids[:, None] == ids[None])
            gr = info_nce(regions, tb["region_text_embed"].reshape(regions.shape), scale, mask)
            loss = gc + lrc + gr
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=float(np.log(100.0)))
        if str(device) == "cpu":
            return float(loss.detach())
        torch.cuda.synchronize()  # a step ends when the device is done (one sync per step, as float(loss) on CPU)
        return None

    if info is not None:
        info["attention"] = attention
    step()
    return step


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def _matmul_timers(dtype: str, with_torch: bool, n: int = 4096) -> dict:
    """name -> fn() giving the GFLOP/s of one n^3 matmul in `dtype`: XLA (jax), NumPy (its BLAS) and, with the
    reference, PyTorch. The MFU denominator is the best any of them reaches in this run: the rate this machine
    demonstrably sustains, not only XLA's (which is below OpenBLAS's at 4096^3 on AVX2 CPUs)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(2).normal(size=(n, n)), dtype)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()

    def rate(fn):
        start = time.perf_counter()
        fn()
        return 2 * n**3 / (time.perf_counter() - start) / 1e9

    timers = {"xla": lambda: rate(lambda: mm(a).block_until_ready())}
    if dtype == "float32" and jax.default_backend() == "cpu":
        host = np.array(a)  # writable: torch.from_numpy shares it
        timers["numpy"] = lambda: rate(lambda: host @ host)
        if with_torch:
            import torch

            th = torch.from_numpy(host)
            timers["torch"] = lambda: rate(lambda: th @ th)
    for fn in timers.values():
        fn()  # warm-up
    return timers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="clip", help="backbone family (models/registry.py)")
    parser.add_argument("--variant", default="ViT-B/16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2, help="steps per round (timed as their mean)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each side's best counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--peak_gflops", type=float, default=None,
                        help="peak for the MFU estimate; default: the best 4096^3 matmul in --dtype of XLA, NumPy "
                             "and (with the reference) PyTorch, measured in this run")
    parser.add_argument("--skip_reference", action="store_true")
    args = parser.parse_args()
    if args.family != "clip" and not args.skip_reference:
        parser.error(f"the PyTorch reference step is CLIP's (transformers CLIPModel); for --family {args.family} "
                     "pass --skip_reference")
    from harmoclip_jax.models import registry

    embed_dim = registry.get(args.family).get_config(args.variant).embed_dim
    batch = _batch(np.random.default_rng(0), args.batch, args.boxes, args.size, embed_dim)

    # Interleaved rounds (ours, the matmul peaks, the reference), each side's best round: a shared or
    # frequency-scaling machine drifts by tens of percent over minutes, and drift must not pick the winner.
    step, flops, region_step, peak_memory = build_ours(args, batch)
    ref_step = None if args.skip_reference else build_reference(args, batch)
    timers = {} if args.peak_gflops else _matmul_timers(args.dtype, with_torch=ref_step is not None)
    seconds, ref_seconds = float("inf"), float("inf")
    peaks = {name: 0.0 for name in timers}
    for _ in range(args.rounds):
        seconds = min(seconds, _time(step, args.steps))
        for name, fn in timers.items():
            peaks[name] = max([peaks[name]] + [fn() for _ in range(3)])
        if ref_step is not None:
            ref_seconds = min(ref_seconds, _time(ref_step, args.steps))
    region_seconds = min(_time(region_step, 5) for _ in range(args.rounds))
    ref_seconds = None if ref_step is None else ref_seconds
    peak = args.peak_gflops or max(peaks.values())
    peak_bytes = peak_memory()
    ours_rate = args.batch / seconds
    ref_rate = args.batch / ref_seconds if ref_seconds else None
    case = {"family": args.family, "variant": args.variant, "image_size": args.size, "batch": args.batch,
            "boxes_per_image": args.boxes,
            "method": "harmoclip (GC+LRC+GR-a), text tower frozen + cached", "dtype": args.dtype,
            "device": _device_kind(), "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}  # they change XLA:CPU's kernels (RESULTS.md)
    print(json.dumps({
        "cpu": cpu_description(),
        "bench": "train_step", "case": case, "unit": "images/s", "ours": ours_rate, "reference": ref_rate,
        "reference_name": "transformers CLIPModel + torch losses/AdamW (PyTorch CPU)" if ref_rate else None,
        "speedup": ours_rate / ref_rate if ref_rate else None,
        "ours_s_per_step": seconds, "reference_s_per_step": ref_seconds,
        "xla_gflops_per_step": flops / 1e9,
        "peak_gflops": peak,
        "peak_source": "--peak_gflops" if args.peak_gflops else
        "best 4096^3 matmul of " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + " GFLOP/s, this run",
        "mfu": flops / seconds / (peak * 1e9),
        "mfu_vs_xla_matmul": flops / seconds / (peaks["xla"] * 1e9) if "xla" in peaks else None,
        "reference_mfu": flops / ref_seconds / (peak * 1e9) if ref_seconds else None,
        "roi_and_region_loss_s": region_seconds, "roi_and_region_loss_share": region_seconds / seconds,
        "peak_device_memory_gib": peak_bytes / 2**30 if peak_bytes else None,
    }))


if __name__ == "__main__":
    main()
