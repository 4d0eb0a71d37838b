"""The backbone seam: a family defined in this file only (a conv image tower and a mean-pooled text tower, nothing
like CLIP) is registered, trained with the HarmoCLIP losses on Scenes, checkpointed, resumed, evaluated and used
through the Predictor, without any change to the package."""
import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harmoclip_jax import checkpoint, config_lib
from harmoclip_jax import workdir as workdir_lib
from harmoclip_jax.metrics_writer import read_metrics
from harmoclip_jax.models import glue, registry
from harmoclip_jax.models.backbone import Backbone

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class ToyVision:
    image_size: int
    patch_size: int  # stride of the conv stem = stride of the dense features


@dataclasses.dataclass(frozen=True)
class ToyText:
    context_length: int
    vocab_size: int = 49408


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vision: ToyVision
    text: ToyText
    width: int = 24
    embed_dim: int = 16
    dtype: str = "float32"
    remat: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        return cls(vision=ToyVision(**d.pop("vision")), text=ToyText(**d.pop("text")), **d)


VARIANTS = {"toy": ToyConfig(vision=ToyVision(image_size=64, patch_size=8), text=ToyText(context_length=16))}


def toy_config(variant, *, image_size=None, text_context_length=None, attention_impl=None, **top):
    del attention_impl  # no attention in this family
    config = variant if isinstance(variant, ToyConfig) else VARIANTS[variant]
    if image_size:
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=image_size))
    if text_context_length:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=text_context_length))
    return dataclasses.replace(config, **top)


class ToyVisionTower(nnx.Module):
    def __init__(self, config: ToyConfig, rngs: nnx.Rngs):
        p = config.vision.patch_size
        self.stem = nnx.Conv(3, config.width, kernel_size=(p, p), strides=(p, p), rngs=rngs)
        self.mix = nnx.Conv(config.width, config.width, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(config.width, config.embed_dim, rngs=rngs)

    def __call__(self, images):
        x = jax.nn.gelu(self.stem(images))
        return self.head(x + jax.nn.gelu(self.mix(x)))  # (B, h, w, E)


class ToyTextTower(nnx.Module):
    def __init__(self, config: ToyConfig, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(config.text.vocab_size, config.width, rngs=rngs)
        self.head = nnx.Linear(config.width, config.embed_dim, rngs=rngs)

    def __call__(self, tokens):
        mask = (tokens > 0)[..., None].astype(jnp.float32)
        pooled = (self.embedding(tokens) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        return self.head(pooled)


class ToyModel(nnx.Module):
    def __init__(self, config: ToyConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.visual = ToyVisionTower(config, rngs)
        self.text = ToyTextTower(config, rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(10.0), jnp.float32))

    def encode_dense(self, images, *, return_global=False):
        dense = self.visual(images)
        return (dense.mean(axis=(1, 2)), dense) if return_global else dense

    def encode_image(self, images):
        return self.encode_dense(images, return_global=True)[0]

    def encode_text(self, tokens):
        return self.text(tokens)


TOY = Backbone(family="toy", model_class=ToyModel, get_config=toy_config, config_from_dict=ToyConfig.from_dict,
               image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25), tokenizer="clip", no_decay=(r"logit_scale",))


@pytest.fixture(scope="module", autouse=True)
def toy_family():
    registry.register(TOY, replace=True)
    yield


def _config(total_steps):
    c = config_lib.load_config(str(ROOT / "configs" / "demo.py") + ":smoke")
    c.model.family = "toy"
    c.model.variant = "toy"
    c.model.context_length = 16
    c.region.text_length = None
    c.total_steps = total_steps
    c.progress_bar = False
    c.plot = False
    c.checkpoint.async_save = False
    return c


def test_a_family_from_outside_the_package_trains_resumes_evaluates_and_predicts(tmp_path):
    from harmoclip_jax import train  # the trainer: only main.py imports it in the package; tests may
    from harmoclip_jax.inference import Predictor

    workdir = tmp_path / "toy"
    metrics = train.train_and_evaluate(_config(3), workdir)
    assert workdir_lib.checkpoint_steps(workdir) == [2, 3]
    assert metrics["eval/boxcls/num_boxes"] > 0 and 0 <= metrics["eval/boxcls/top1"] <= 1
    assert 0 <= metrics["eval/retrieval/t2i_r1"] <= 1
    records = read_metrics(workdir / workdir_lib.METRICS)
    assert {"loss/gc", "loss/lrc", "loss/gr"} <= set(records[-1])  # the HarmoCLIP losses
    losses_3 = {r["step"]: r["loss"] for r in records if "loss" in r}

    # Resume: two more steps continue from the step-3 checkpoint (steps 1-3 are not redone).
    train.train_and_evaluate(_config(5), workdir)
    records = read_metrics(workdir / workdir_lib.METRICS)
    losses_5 = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses_5) == [1, 2, 3, 4, 5] and all(losses_5[s] == losses_3[s] for s in (1, 2, 3))
    assert workdir_lib.checkpoint_steps(workdir)[-1] == 5

    # The params export records the family; the predictor restores the toy model from the workdir.
    predictor = Predictor.from_checkpoint(workdir)
    assert type(predictor.model) is ToyModel and predictor.backbone is TOY
    from_checkpoint_params = glue.params_of(predictor.model)
    from_export = glue.params_of(checkpoint.load_params(workdir / workdir_lib.PARAMS))
    jax.tree.map(np.testing.assert_array_equal, from_checkpoint_params, from_export)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)
    result = predictor.classify_regions(image, [[0, 0, 30, 20], [10, 5, 56, 40]], ["red circle", "blue star"])
    assert result.probs.shape == (2, 2)
    np.testing.assert_allclose(result.probs.sum(-1), 1.0, rtol=1e-5)  # the family's softmax probabilities
    # Preprocessing used the family's own normalisation, not CLIP's.
    np.testing.assert_allclose(predictor.preprocess(np.full((8, 8, 3), 255, np.uint8))[0], 2.0, rtol=1e-6)
