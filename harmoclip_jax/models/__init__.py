"""CLIP towers (Flax NNX), variant table and checkpoint conversion."""
