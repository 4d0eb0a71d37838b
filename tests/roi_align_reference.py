"""A plain-loop NumPy port of torchvision's CPU RoIAlign kernel (roi_align_kernel.cpp), test-only.

Written from the algorithm's description, in float32 scalar arithmetic like the C++ kernel with
T = float. Layout follows our op: features (B, H, W, C), boxes (B, T, 4) -> (B, T, oh, ow, C).
"""
import math

import numpy as np

f32 = np.float32


def _bilinear(feature_map, y, x):
    """torchvision bilinear_interpolate for one sample; feature_map (H, W, C)."""
    height, width = feature_map.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature_map.shape[-1], np.float32)
    y = max(y, f32(0.0))
    x = max(x, f32(0.0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = f32(y - y_low), f32(x - x_low)
    hy, hx = f32(1.0) - ly, f32(1.0) - lx
    return (
        hy * hx * feature_map[y_low, x_low]
        + hy * lx * feature_map[y_low, x_high]
        + ly * hx * feature_map[y_high, x_low]
        + ly * lx * feature_map[y_high, x_high]
    )


def roi_align_reference(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    features = np.asarray(features, np.float32)
    boxes = np.asarray(boxes, np.float32)
    out_h, out_w = output_size
    batch, num_boxes = boxes.shape[:2]
    out = np.zeros((batch, num_boxes, out_h, out_w, features.shape[-1]), np.float32)
    scale = f32(spatial_scale)
    offset = f32(0.5) if aligned else f32(0.0)
    for b in range(batch):
        for t in range(num_boxes):
            x1, y1, x2, y2 = boxes[b, t]
            start_w, start_h = x1 * scale - offset, y1 * scale - offset
            end_w, end_h = x2 * scale - offset, y2 * scale - offset
            roi_w, roi_h = f32(end_w - start_w), f32(end_h - start_h)
            if not aligned:
                roi_w, roi_h = max(roi_w, f32(1.0)), max(roi_h, f32(1.0))
            bin_h, bin_w = f32(roi_h / f32(out_h)), f32(roi_w / f32(out_w))
            grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(f32(roi_h / f32(out_h))))
            grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(f32(roi_w / f32(out_w))))
            count = max(grid_h * grid_w, 1)
            for ph in range(out_h):
                for pw in range(out_w):
                    acc = np.zeros(features.shape[-1], np.float32)
                    for iy in range(grid_h):
                        y = f32(start_h + f32(ph) * bin_h + f32(f32(iy + 0.5) * bin_h) / f32(grid_h))
                        for ix in range(grid_w):
                            x = f32(start_w + f32(pw) * bin_w + f32(f32(ix + 0.5) * bin_w) / f32(grid_w))
                            acc += _bilinear(features[b], y, x)
                    out[b, t, ph, pw] = acc / f32(count)
    return out
