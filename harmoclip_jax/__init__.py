"""HarmoCLIP in JAX/Flax: global and regional contrastive vision-language training."""

__version__ = "0.1.0"
