"""Token-level LRC ("Text Token Space", reading B: `config.loss.lrc_text="tokens"`): per-token text embeddings of
every family, span pooling, the pipeline's lexeme spans, the train step and config validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harmoclip_jax import losses as L
from harmoclip_jax.models import clip, eva02, siglip


@pytest.mark.parametrize("model_class,variant", [(clip.CLIP, "test-tiny"), (eva02.EVA02CLIP, "EVA02-test-tiny"),
                                                 (siglip.SigLIP, "SigLIP-test-tiny")])
def test_encode_text_tokens_at_the_pooled_position_equals_encode_text(model_class, variant):
    """CLIP/EVA02: the row at the EOT position (argmax id) is `encode_text`; SigLIP: the last position of the row padded
    to the context (the one SigLIP pools). Per-token outputs are projected to the joint width, not normalised."""
    model = model_class(variant, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    length = 12
    if model_class is siglip.SigLIP:
        tokens = rng.integers(2, 1000, (3, length)).astype(np.int32)
        tokens[:, 9:] = model.config.text.pad_id
    else:
        tokens = rng.integers(1, 400, (3, length)).astype(np.int32)
        tokens[:, 0] = 49406
        for row, end in enumerate((4, 7, 11)):
            tokens[row, end], tokens[row, end + 1:] = 49407, 0
    per_token = np.asarray(model.encode_text_tokens(jnp.asarray(tokens)))
    pooled = np.asarray(model.encode_text(jnp.asarray(tokens)))
    assert per_token.shape[0] == 3 and per_token.shape[-1] == pooled.shape[-1]
    if model_class is siglip.SigLIP:
        assert per_token.shape[1] == model.config.text.context_length
        at = per_token[:, -1]
    else:
        assert per_token.shape[1] == length
        at = per_token[np.arange(3), tokens.argmax(-1)]
    np.testing.assert_allclose(at, pooled, rtol=1e-5, atol=1e-6)
    assert not np.allclose(per_token[:, 1], at)  # other positions are other vectors
