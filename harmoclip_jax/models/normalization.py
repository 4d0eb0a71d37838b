"""Pixel normalisations (mean, std of [0, 1] RGB) of pretrained weights. No jax here: input workers import it."""
import numpy as np

# OpenAI CLIP's (also open_clip's OpenAI and EVA-CLIP checkpoints).
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def normalize_pixels(pixels, mean, std):
    """uint8 RGB pixels (..., 3) -> float32 `(pixels / 255 - mean) / std`, with numpy or jax arrays alike: the host
    pipeline and the device (uint8 host batches, `config.data.image_dtype`) compute it the same way."""
    scaled = pixels.astype(np.float32) * np.float32(1 / 255)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
