"""Region features from a model's outputs: RoIAlign-pooled dense features, and box crops as model inputs."""
from __future__ import annotations

import jax

from harmoclip_jax.ops.boxes import enlarge_boxes
from harmoclip_jax.ops.roi_align import roi_align


def region_embeddings(dense: jax.Array, boxes: jax.Array, *, stride: int, output_size: int = 1,
                      sampling_ratio: int = -1) -> jax.Array:
    """(B,h,w,E) dense features of stride `stride` pixels, (B,T,4) pixel xyxy boxes -> (B,T,E): RoIAlign
    (`output_size` bins per side, torchvision's aligned sampling) averaged over the bins."""
    pooled = roi_align(dense, boxes, output_size=output_size, spatial_scale=1.0 / stride,
                       sampling_ratio=sampling_ratio, aligned=True)
    return pooled.mean(axis=(2, 3))


def box_crops(images: jax.Array, boxes: jax.Array, scale: float) -> jax.Array:
    """(B,S,S,3), (B,T,4) -> (B*T,S,S,3): each box enlarged `scale`x (clipped to the image), bilinearly resized
    to the model input. RoIAlign with one sample per output pixel is exactly that resize, as matmuls."""
    b, s = images.shape[0], images.shape[1]
    big = enlarge_boxes(boxes, scale, image_size=(s, s))
    crops = roi_align(images, big, output_size=(s, s), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return crops.reshape(b * boxes.shape[1], s, s, images.shape[-1])
