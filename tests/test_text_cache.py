"""TextEmbeddingCache: encodes each distinct token row once and keeps rows of any length on disk."""
import numpy as np

from harmoclip_jax.text_cache import TextEmbeddingCache


def _encode(tokens):  # deterministic stand-in for a frozen text tower; depends on the row's length too
    return np.stack([tokens.sum(-1), tokens.max(-1), np.full(len(tokens), tokens.shape[-1])], -1).astype(np.float32)


def test_rows_of_different_lengths_survive_save_and_load(tmp_path):
    path = tmp_path / "cache.npz"
    cache = TextEmbeddingCache(_encode, path, chunk=4)
    captions = np.array([[5, 7, 9, 0, 0, 0], [5, 8, 0, 0, 0, 0]], np.int32)  # full context
    region_texts = captions[:, :3]  # cut to config.region.text_length
    want_captions, want_regions = cache.lookup(captions), cache.lookup(region_texts)
    np.testing.assert_array_equal(want_captions[:, 2], 6)
    np.testing.assert_array_equal(want_regions[:, 2], 3)
    assert cache.lookup(np.stack([captions, captions])).shape == (2, 2, 3)
    assert (cache.misses, len(cache)) == (4, 4)
    cache.save()
    again = TextEmbeddingCache(lambda t: (_ for _ in ()).throw(AssertionError("re-encoded")), path)
    assert len(again) == 4
    np.testing.assert_array_equal(again.lookup(captions), want_captions)
    np.testing.assert_array_equal(again.lookup(region_texts), want_regions)
    assert again.misses == 0
