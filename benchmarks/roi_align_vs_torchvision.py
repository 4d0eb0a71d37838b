"""RoIAlign vs the real torchvision.ops.roi_align, where torchvision is importable (not on the CPU CI machine).

Part 1: max |ours - torchvision| over random maps/boxes (inside, outside, zero-area, whole-map), output sizes
1x1/7x7/2x3, sampling_ratio -1/1/2, aligned True/False, on torchvision's CPU and (if present) CUDA kernels.
Part 2 (CUDA only): timing of ours (jax, default matmul precision) vs torchvision's CUDA kernel, JSON lines.

  python3 benchmarks/roi_align_vs_torchvision.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json, time, numpy as np, torch, torchvision, jax, jax.numpy as jnp
from harmoclip_jax.ops.roi_align import roi_align
rng = np.random.default_rng(0); worst = {}
for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
  for trial in range(30):
    H, W = int(rng.integers(3, 16)), int(rng.integers(3, 16)); B, T, C = 2, 12, 3
    f = rng.normal(size=(B, H, W, C)).astype(np.float32); s = 1 / 16
    c = rng.uniform(-3, max(H, W) + 3, (B, T, 2)) / s; z = rng.uniform(0, max(H, W) * 0.9, (B, T, 2)) / s
    z[:, :2] = 0; bx = np.concatenate([c - z / 2, c + z / 2], -1).astype(np.float32); bx[:, 2] = [0, 0, W / s, H / s]
    for out in [(1, 1), (7, 7), (2, 3)]:
      for sr in [-1, 1, 2]:
        for al in [True, False]:
          rois = torch.cat([torch.arange(B).repeat_interleave(T)[:, None].float(), torch.tensor(bx.reshape(-1, 4))], 1).to(dev)
          ref = torchvision.ops.roi_align(torch.tensor(f).permute(0, 3, 1, 2).to(dev), rois, out, s, sr, al)
          ref = ref.permute(0, 2, 3, 1).reshape(B, T, *out, C).cpu().numpy()
          got = np.asarray(roi_align(f, bx, out, s, sr, al, max_samples_per_bin=64, precision='highest'))
          k = f'{dev} {out} sr={sr} al={al}'; worst[k] = max(worst.get(k, 0), float(np.abs(got - ref).max()))
print(json.dumps(worst)); print('MAX', max(worst.values()), torchvision.__version__, jax.__version__, jax.devices())
if not torch.cuda.is_available():
  sys.exit(0)
def tm(fn, n=50):
  fn(); t = time.perf_counter()
  for _ in range(n): fn()
  return (time.perf_counter() - t) / n
B, T, G, C = 32, 20, 14, 768
f = rng.normal(size=(B, G, G, C)).astype(np.float32); c = rng.uniform(0, 224, (B, T, 2)); z = rng.uniform(16, 224, (B, T, 2))
bx = np.clip(np.concatenate([c - z / 2, c + z / 2], -1), 0, 224).astype(np.float32)
fj, bj = jnp.asarray(f), jnp.asarray(bx); ft = torch.tensor(f).permute(0, 3, 1, 2).contiguous().cuda()
rois = torch.cat([torch.arange(B).repeat_interleave(T)[:, None].float(), torch.tensor(bx.reshape(-1, 4))], 1).cuda()
for o in [1, 7]:
  fw = jax.jit(lambda f: roi_align(f, bj, (o, o), 1 / 16)); bw = jax.jit(jax.grad(lambda f: jnp.sum(roi_align(f, bj, (o, o), 1 / 16) ** 2)))
  ours = [tm(lambda: fw(fj).block_until_ready()), tm(lambda: bw(fj).block_until_ready())]
  def tf():
    r = torchvision.ops.roi_align(ft, rois, (o, o), 1 / 16, -1, True); torch.cuda.synchronize()
  fr = ft.clone().requires_grad_()
  def tb():
    g, = torch.autograd.grad((torchvision.ops.roi_align(fr, rois, (o, o), 1 / 16, -1, True) ** 2).sum(), fr); torch.cuda.synchronize()
  ref = [tm(tf), tm(tb)]
  for m, a, r in zip(['forward', 'forward+backward'], ours, ref):
    print(json.dumps({'bench': 'roi_align', 'case': {'B': B, 'grid': '14x14x768', 'T': T, 'output': f'{o}x{o}', 'mode': m, 'backend': torch.cuda.get_device_name()}, 'unit': 'boxes/s', 'ours': B * T / a, 'reference': B * T / r, 'reference_name': 'torchvision.ops.roi_align CUDA (torch)', 'speedup': r / a}))
