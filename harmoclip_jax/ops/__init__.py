"""Pure array ops: region pooling, box helpers, dense (per-patch) scoring, on-device resizing (no Flax)."""
