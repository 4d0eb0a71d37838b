"""Pixel normalisations (mean, std of [0, 1] RGB) of pretrained weights. No jax here: input workers import it."""

# OpenAI CLIP's (also open_clip's OpenAI and EVA-CLIP checkpoints).
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
