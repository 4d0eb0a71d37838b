"""Pure jax.numpy ops: region pooling and box helpers (no Flax)."""
