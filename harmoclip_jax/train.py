"""Training and evaluation: `train_and_evaluate(config, workdir)` (importable from a notebook).

Functional core: the model is split once (`nnx.split`) into a graph definition and a pure dict of parameters;
the training state is a plain pytree {params, opt_state, step, rng[, teacher]}; `train_step(state, batch, consts)
-> (state, metrics)` is one `jax.jit` with explicit in/out shardings and the state donated. Initialisation is
shape-first (eval_shape -> shardings -> jit with out_shardings), so no full unsharded copy is ever built.

Order at start: resume from `workdir/checkpoints` if it has a step, else initialise (`config.init`). The grain
iterator position, rng and optimizer state are part of every checkpoint, so a resumed run continues with exactly
the batches and numbers an uninterrupted one would have produced.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from harmoclip_jax import checkpoint as ckpt_lib
from harmoclip_jax import (accelerators, config_lib, distributed, evaluators, losses, metrics_writer, optim, resume,
                           sharding)
from harmoclip_jax import workdir as workdir_lib
from harmoclip_jax.data import registry as data_registry
from harmoclip_jax.models import glue as glue_lib
from harmoclip_jax.models import registry
from harmoclip_jax.models.backbone import ImageTextModel
from harmoclip_jax.models.glue import ModelGlue
from harmoclip_jax.ops.regions import box_crops, region_embeddings
from harmoclip_jax.text_cache import TextEmbeddingCache, fingerprint
from harmoclip_jax.tokenizer import get_tokenizer

if TYPE_CHECKING:  # the data modules import grain; train imports them when it runs
    from harmoclip_jax.data.lexeme_vocab import LexemeVocab

log = logging.getLogger(__name__)

# Batch keys that carry token ids, and the loss-output key each one becomes.
TEXT_INPUTS = {"text": "text_embed", "region_text": "region_text_embed", "lexeme": "lexeme_embed"}
# Region texts repeat within a batch (Scenes: 256 lexemes, 36 distinct): with a bound in these config.region
# fields, the step encodes each distinct text once (a `{key}_table` of token rows and a `{key}_index` into it).
DISTINCT_TEXT_FIELDS = {"region_text": "distinct_region_texts", "lexeme": "distinct_lexemes"}
# Token-level LRC (config.loss.lrc_text="tokens"): batch keys whose token rows go through the text tower once, every
# position projected (`encode_text_tokens`), and the loss-output key of those per-token embeddings. Never cached: the
# text cache holds one embedding per text.
TOKEN_TEXT_INPUTS = {"text": "text_token_embed", "region_text": "region_text_token_embed"}
TEACHER_OUTPUTS = ("teacher_crop_embed", "teacher_region_embed")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; training stopped without saving the bad state."""


# ------------------------------------------------------------------------------------------- model outputs


def _regions(dense: jax.Array, boxes: jax.Array, region: ml_collections.ConfigDict, stride: int) -> jax.Array:
    return region_embeddings(dense, boxes, stride=stride, output_size=region.output_size,
                             sampling_ratio=region.sampling_ratio)


def compute_outputs(model: ImageTextModel, teacher: ImageTextModel | None, batch: dict, consts: dict,
                    needed: set[str], region: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """The loss inputs (`losses` module contract) that `needed` names, from one batch (images as the model takes
    them: `ModelGlue.model_images`)."""
    out: dict[str, jax.Array] = {}
    images, patch = batch["image"], model.config.vision.patch_size
    b, t = batch["boxes"].shape[:2]
    if "region_embed" in needed:
        if "image_embed" in needed:
            out["image_embed"], dense = model.encode_dense(images, return_global=True)
        else:
            dense = model.encode_dense(images)
        out["region_embed"] = _regions(dense, batch["boxes"], region, patch)
    elif "image_embed" in needed:
        out["image_embed"] = model.encode_image(images)
    for key, name in TEXT_INPUTS.items():
        if name in needed:
            if name in batch:  # from the frozen-text-tower cache
                out[name] = batch[name]
            elif f"{key}_table" in batch:  # each distinct text encoded once
                out[name] = model.encode_text(batch[f"{key}_table"])[batch[f"{key}_index"]]
            else:
                tokens = batch[key]
                out[name] = model.encode_text(tokens.reshape(-1, tokens.shape[-1])).reshape(*tokens.shape[:-1], -1)
    for key, name in TOKEN_TEXT_INPUTS.items():
        if name in needed:
            if f"{key}_table" in batch:  # each distinct text encoded once
                out[name] = model.encode_text_tokens(batch[f"{key}_table"])[batch[f"{key}_index"]]
            else:
                tokens = batch[key]
                per_token = model.encode_text_tokens(tokens.reshape(-1, tokens.shape[-1]))
                out[name] = per_token.reshape(*tokens.shape[:-1], *per_token.shape[1:])
    if "crop_embed" in needed or "teacher_crop_embed" in needed:
        crops = box_crops(images, batch["boxes"], region.crop_scale)
        if "crop_embed" in needed:
            out["crop_embed"] = model.encode_image(crops).reshape(b, t, -1)
        if "teacher_crop_embed" in needed:
            out["teacher_crop_embed"] = jax.lax.stop_gradient(teacher.encode_image(crops).reshape(b, t, -1))
    if "teacher_region_embed" in needed:
        dense = teacher.encode_dense(images)
        out["teacher_region_embed"] = jax.lax.stop_gradient(_regions(dense, batch["boxes"], region, patch))
    for name in ("concept", "lexeme_vocab"):  # constant text sets: cached embeddings, or tokens encoded here
        if f"{name}_embed" in needed:
            out[f"{name}_embed"] = consts[f"{name}_embed"] if f"{name}_embed" in consts else \
                model.encode_text(consts[f"{name}_tokens"])
    if "logit_scale" in needed:
        out["logit_scale"] = model.logit_scale[...]
    if "logit_bias" in needed:  # sigmoid (SigLIP) losses
        if getattr(model, "logit_bias", None) is None:
            raise ValueError(f"config.loss.global_form='sigmoid' needs a model with a logit_bias (the siglip family), "
                             f"not {type(model).__name__}")
        out["logit_bias"] = model.logit_bias[...]
    return out


# ------------------------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Trainer:
    """Everything built from a config before the loop; also handy on its own in notebooks and tests."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    glue: ModelGlue
    tx: optax.GradientTransformation
    train_mask: Any
    needed: set[str]
    text_frozen: bool
    uses_teacher: bool
    abstract_state: Any  # ShapeDtypeStructs with shardings
    state_shardings: Any
    train_step: Callable  # jitted (state, batch, consts) -> (state, metrics)

    @property
    def batch_sharding(self):
        return sharding.batch_sharding(self.mesh)

    def init_state(self, params: Any | None = None) -> Any:
        """A fresh sharded training state; `params` (sharded, e.g. a loaded checkpoint) or a seeded init."""
        init_params, init_rest = self._jitted_init
        if params is None:
            params = init_params(self.config.seed)
        else:
            params = jax.device_put(params, self.state_shardings["params"])
        return {"params": params, **init_rest(params)}

    @functools.cached_property
    def _jitted_init(self) -> tuple[Callable, Callable]:
        """`init_state`'s two jitted functions (the parameters; the optimizer state, step, rng and teacher from
        them), built once per trainer: new ones per call would trace and lower the whole init again each time."""
        sh = self.state_shardings

        def rest(p):
            state = {"opt_state": self.tx.init(p), "step": jnp.zeros((), jnp.int32),
                     "rng": jax.random.key_data(jax.random.key(self.config.seed))}
            if self.uses_teacher:
                state["teacher"] = jax.tree.map(jnp.copy, p[self.glue.image_tower])
            return state

        out_sh = {k: v for k, v in sh.items() if k != "params"}
        return (jax.jit(self.glue.init_params, static_argnums=0, out_shardings=sh["params"]),
                jax.jit(rest, out_shardings=out_sh))

    def tokenize(self, texts) -> np.ndarray:
        """Token ids of `texts` for this model (its family's tokenizer at config.model.context_length)."""
        return get_tokenizer(config_lib.tokenizer_name(self.config))(list(texts), self.config.model.context_length)

    def eval_fns(self) -> evaluators.EvalFns:
        glue, region = self.glue, self.config.region
        p_sh, b_sh, repl = self.state_shardings["params"], self.batch_sharding, sharding.replicated(self.mesh)

        pixels = glue.model_images  # uint8 host batches are normalised inside each jitted function

        def encode_captions(p, tokens):
            return glue.merge(p).encode_text(tokens.reshape(-1, tokens.shape[-1])).reshape(*tokens.shape[:2], -1)

        def encode_regions(p, images, boxes):
            return _regions(glue.merge(p).encode_dense(pixels(images)), boxes, region, glue.patch_size)

        encode_texts_jit = jax.jit(lambda p, t: glue.merge(p).encode_text(t), in_shardings=(p_sh, b_sh),
                                   out_shardings=repl)

        def encode_texts(p, tokens: np.ndarray):
            return encode_texts_jit(p, sharding.global_from_host(np.asarray(tokens), b_sh))

        return evaluators.EvalFns(
            encode_images=jax.jit(lambda p, x: glue.merge(p).encode_image(pixels(x)), in_shardings=(p_sh, b_sh),
                                  out_shardings=repl),
            encode_captions=jax.jit(encode_captions, in_shardings=(p_sh, b_sh), out_shardings=repl),
            encode_regions=jax.jit(encode_regions, in_shardings=(p_sh, b_sh, b_sh), out_shardings=repl),
            encode_texts=encode_texts,
            tokenize=self.tokenize,
            encode_dense=jax.jit(lambda p, x: glue.merge(p).encode_dense(pixels(x)), in_shardings=(p_sh, b_sh),
                                 out_shardings=repl),
        )


def _state_shardings(abstract: Any, mesh, config) -> Any:
    rules = [tuple(r) for r in config.sharding.rules]
    return sharding.param_shardings(abstract, mesh, rules, config.sharding.fsdp_min_size_mb)


def make_train_step(config, glue: ModelGlue, tx, schedule, train_mask, needed, uses_teacher):
    """The pure train step (not jitted): (state, batch, consts) -> (state, metrics)."""
    accum = int(config.optim.grad_accum_steps)
    nan_step = int(config.debug.inject_nan_at_step)

    def loss_fn(params, teacher, batch, consts, step):
        # Frozen parameters get no gradient: XLA then drops their backward computation entirely.
        params = jax.tree.map(lambda p, trained: p if trained else jax.lax.stop_gradient(p), params, train_mask)
        model = glue.merge(params)
        teacher_model = glue.merge({**params, glue.image_tower: teacher}) if uses_teacher else None
        batch = {**batch, "image": glue.model_images(batch["image"], batch.get("image_hw"))}
        outputs = compute_outputs(model, teacher_model, batch, consts, needed, config.region)
        total, terms = losses.total_loss(config.loss, outputs, batch)
        if nan_step >= 0:
            total = jnp.where(step + 1 == nan_step, jnp.nan, total)
        return total, terms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, consts):
        params, step = state["params"], state["step"]
        teacher = state.get("teacher")
        if accum == 1:
            (loss, terms), grads = grad_fn(params, teacher, batch, consts, step)
        else:
            # Micro-batch j = examples j, j+accum, ...: each device keeps its own rows (no resharding).
            def split(x):
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                (loss, terms), grads = grad_fn(params, teacher, mb, consts, step)
                return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, teacher, jax.tree.map(
                lambda x: x[0], micro), consts, step)))
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, terms, grads), _ = jax.lax.scan(body, zeros, micro)
            loss, terms, grads = jax.tree.map(lambda x: x / accum, (loss, terms, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        # CLIP's temperature clamp: the scale exp(logit_scale) never exceeds 100.
        params["logit_scale"] = jnp.minimum(params["logit_scale"], config.optim.max_logit_scale)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": step + 1}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(step),
                   "logit_scale": jnp.exp(params["logit_scale"])}
        metrics.update({f"loss/{k}": v for k, v in terms.items() if k != "total"})
        if "lexeme_span" in batch:  # token-level LRC: the share of real regions whose lexeme was found in the text
            real = batch["box_mask"].astype(bool)
            found = real & (batch["lexeme_span"][..., 1] > batch["lexeme_span"][..., 0])
            metrics["lrc/span_found"] = jnp.sum(found) / jnp.maximum(jnp.sum(real), 1)
        return new_state, metrics

    return train_step


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """Validates `config`, builds the mesh, abstract state, shardings, optimizer and the jitted train step."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    config_lib.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    backbone = config_lib.backbone(config)
    glue = ModelGlue(backbone, backbone.config_for(config.model))
    tx, schedule, train_mask = optim.make_optimizer(config.optim, glue.abstract_params, config.total_steps,
                                                    backbone)
    needed = losses.required_outputs(config.loss)
    text_frozen = not any(v for k, v in _flat(train_mask).items() if backbone.in_text_tower(k))
    if text_frozen and needed & set(TOKEN_TEXT_INPUTS.values()):
        log.warning("config.loss.lrc_text='tokens' with a frozen text tower: CLIP's causal text tower never trained "
                    "tokens other than EOT into the joint space, so token-level LRC should train the text tower (or its "
                    "last blocks): config.optim.freeze_text_tower=False")
    uses_teacher = bool(needed & set(TEACHER_OUTPUTS))

    abstract = {"params": glue.abstract_params,
                "opt_state": jax.eval_shape(tx.init, glue.abstract_params),
                "step": jax.ShapeDtypeStruct((), jnp.int32),
                "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
    if uses_teacher:
        abstract["teacher"] = glue.abstract_params[glue.image_tower]
    shardings = _state_shardings(abstract, mesh, config)
    for key in ("step", "rng"):
        shardings[key] = sharding.replicated(mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)

    step_fn = make_train_step(config, glue, tx, schedule, train_mask, needed, uses_teacher)
    repl = sharding.replicated(mesh)
    jitted = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh), repl),
                     out_shardings=(shardings, repl), donate_argnums=0)
    return Trainer(config=config, mesh=mesh, glue=glue, tx=tx, train_mask=train_mask,
                   needed=needed, text_frozen=text_frozen, uses_teacher=uses_teacher, abstract_state=abstract,
                   state_shardings=shardings, train_step=jitted)


def _flat(tree) -> dict[str, Any]:
    return {sharding.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------ batch prep


def device_batch_keys(trainer: Trainer, cache_active: bool) -> list[str]:
    """Keys of the host batch the train step needs (tokens are replaced by cached embeddings when frozen, or by a
    table of distinct texts and indices into it when config.region bounds their number)."""
    keys = {"image", "boxes", "box_mask", "lexeme_id"} | losses.required_batch_keys(trainer.config.loss)
    if trainer.config.data.get("resize_canvas", 0):
        keys.add("image_hw")
    for key, name in TOKEN_TEXT_INPUTS.items():  # per-token embeddings: always encoded in the step
        if name in trainer.needed:
            distinct = not cache_active and trainer.config.region.get(DISTINCT_TEXT_FIELDS.get(key, ""), 0)
            keys.update((f"{key}_table", f"{key}_index") if distinct else (key,))
    for key, name in TEXT_INPUTS.items():
        if name in trainer.needed:
            if cache_active:
                keys.add(name)
            elif trainer.config.region.get(DISTINCT_TEXT_FIELDS.get(key, ""), 0):
                keys.update((f"{key}_table", f"{key}_index"))
            else:
                keys.add(key)
    return sorted(keys)


def abstract_batch(trainer: Trainer, cache_active: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch `prepare_batch` gives the train step, as ShapeDtypeStructs on the batch sharding: what
    ahead-of-time compilation lowers the step with (`harmoclip_jax.aot`); tests hold it to a real prepared batch."""
    config = trainer.config
    b, t, s = config.batch_size, config.data.max_regions, config.model.image_size
    length = config.region.text_length or config.model.context_length
    embed = trainer.glue.config.embed_dim
    canvas = config.data.get("resize_canvas", 0) or s
    uint8 = config.data.get("image_dtype", "float32") == "uint8"
    shapes = {"image": ((b, canvas, canvas, 3), jnp.uint8 if uint8 else jnp.float32), "image_hw": ((b, 2), jnp.int32),
              "boxes": ((b, t, 4), jnp.float32), "box_mask": ((b, t), jnp.bool_), "lexeme_id": ((b, t), jnp.int32),
              "lexeme_span": ((b, t, 2), jnp.int32), "text": ((b, config.model.context_length), jnp.int32),
              "region_text": ((b, t, length), jnp.int32), "lexeme": ((b, t, length), jnp.int32)}
    for key, name in TEXT_INPUTS.items():
        shapes[name] = (shapes[key][0][:-1] + (embed,), jnp.float32)
    processes = jax.process_count()
    for key, field in DISTINCT_TEXT_FIELDS.items():  # every process's table, concatenated
        shapes[f"{key}_table"] = ((int(config.region.get(field, 0)) * processes, length), jnp.int32)
        shapes[f"{key}_index"] = ((b, t), jnp.int32)
    keys = device_batch_keys(trainer, cache_active)
    unknown = [k for k in keys if k not in shapes]
    if unknown:
        raise KeyError(f"abstract_batch: no shape for the batch keys {unknown}; add them here")
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=trainer.batch_sharding) for k in keys}


def abstract_consts(trainer: Trainer, cache_active: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """`make_consts`'s step constants as ShapeDtypeStructs: the RegionCLIP concepts (`config.region.concepts`, or
    COCO's 80 classes when the dataset names them) and the LRC vocabulary at its bound `lexeme_vocab_size`."""
    config = trainer.config
    sizes = {}
    if "concept_embed" in trainer.needed:
        sizes["concept"] = len(config.region.concepts) or 80
    if "lexeme_vocab_embed" in trainer.needed:
        sizes["lexeme_vocab"] = int(config.region.lexeme_vocab_size)
    length = config.region.text_length or config.model.context_length
    repl = sharding.replicated(trainer.mesh)
    out = {}
    for name, n in sizes.items():
        if cache_active:
            out[f"{name}_embed"] = jax.ShapeDtypeStruct((n, trainer.glue.config.embed_dim), jnp.float32, sharding=repl)
        else:
            width = length if name == "lexeme_vocab" else config.model.context_length
            out[f"{name}_tokens"] = jax.ShapeDtypeStruct((n, width), jnp.int32, sharding=repl)
    return out


def distinct_texts(local: dict, key: str, bound: int, process_index: int = 0) -> dict:
    """Replaces `local[key]` (..., L) token rows by `{key}_table` (bound, L): its distinct rows, zero-padded, and
    `{key}_index` (...): each row's index into the global table (the processes' tables concatenated in order)."""
    tokens = local[key]
    table, inverse = np.unique(tokens.reshape(-1, tokens.shape[-1]), axis=0, return_inverse=True)
    if len(table) > bound:
        raise ValueError(f"a batch has {len(table)} distinct {key} texts, more than config.region."
                         f"{DISTINCT_TEXT_FIELDS[key]}={bound}; raise it (0 encodes every text)")
    padded = np.zeros((bound, tokens.shape[-1]), tokens.dtype)
    padded[: len(table)] = table
    index = (inverse.reshape(tokens.shape[:-1]) + process_index * bound).astype(np.int32)
    return {**{k: v for k, v in local.items() if k != key}, f"{key}_table": padded, f"{key}_index": index}


REGION_TEXTS = ("region_text", "lexeme")


def shorten_region_texts(local: dict, length: int | None) -> dict:
    """Cuts region captions / lexemes to their first `length` tokens (exact: see CLIP.encode_text), checking that
    no text is longer."""
    if not length:
        return local
    local = dict(local)
    for key in REGION_TEXTS:
        if key in local and local[key].shape[-1] > length:
            tokens = local[key]
            if np.any(tokens[..., length:]):
                raise ValueError(f"a {key} in this batch has more than config.region.text_length={length} tokens; "
                                 "raise config.region.text_length (or set it to None for the full context)")
            local[key] = tokens[..., :length]
    return local


def prepare_batch(local: dict, keys: list[str], cache: TextEmbeddingCache | None,
                  region: ml_collections.ConfigDict | None = None, vocab: LexemeVocab | None = None
                  ) -> dict[str, np.ndarray]:
    """The host batch the train step takes: needed keys only, region texts cut to `region.text_length` (and as
    tables of distinct texts when `keys` asks for them), cached text embeddings, and lexeme ids as rows of `vocab`
    when LRC uses vocabulary negatives."""
    local = shorten_region_texts(local, region.text_length if region is not None else None)
    if vocab is not None:
        local = dict(local, lexeme_id=vocab.index(local["lexeme_id"]))
    for key in DISTINCT_TEXT_FIELDS:
        if f"{key}_table" in keys:
            local = distinct_texts(local, key, int(region[DISTINCT_TEXT_FIELDS[key]]), jax.process_index())
    out = {}
    for key in keys:
        if key in local:
            out[key] = local[key]
        else:  # an embedding from the cache
            token_key = next(k for k, v in TEXT_INPUTS.items() if v == key)
            out[key] = cache.lookup(local[token_key])
    return out


def make_text_cache(trainer: Trainer, params, workdir: pathlib.Path, dataset: str) -> TextEmbeddingCache | None:
    """A cache of frozen-text-tower embeddings for `dataset`, or None when the text tower trains."""
    config = trainer.config
    if not (config.text_cache.enabled and trainer.text_frozen):
        return None
    host = sharding.to_host(params)
    text_params = {k: v for k, v in _flat(host).items() if trainer.glue.backbone.in_text_tower(k)}
    key = fingerprint(text_params)
    # Encoding runs on one local device: processes miss different texts, so no collective may be involved.
    device = jax.local_devices()[0]
    local_mesh = jax.make_mesh((1,), ("local",), axis_types=(jax.sharding.AxisType.Auto,), devices=[device])
    local = jax.device_put(host, device)
    glue = trainer.glue
    encode = jax.jit(lambda p, t: glue.merge(p).encode_text(t))

    def encode_local(tokens):
        with jax.set_mesh(local_mesh):
            return np.asarray(encode(local, jax.device_put(tokens, device)))

    directory = pathlib.Path(config.text_cache.dir or workdir / workdir_lib.TEXT_CACHE)
    name = dataset.replace("/", "_")
    return TextEmbeddingCache(encode_local, directory / f"{name}-{key}-p{jax.process_index()}.npz")


def make_consts(trainer: Trainer, cache: TextEmbeddingCache | None, class_names: list[str],
                vocab: LexemeVocab | None = None) -> dict:
    """Step constants: the RegionCLIP concept names and the LRC lexeme vocabulary, as tokens (encoded in the step,
    so they follow a training text tower) or as embeddings computed once when the text tower is frozen."""
    config = trainer.config
    texts = {}
    if "concept_embed" in trainer.needed:
        names = list(config.region.concepts) or class_names
        if not names:
            raise ValueError("method=regionclip needs concept names: set config.region.concepts (RegionCLIP uses a "
                             "pool of nouns parsed from captions) or train on a dataset with class_names metadata")
        texts["concept"] = [config.region.concept_template.format(n) for n in names]
    if "lexeme_vocab_embed" in trainer.needed:
        if vocab is None or not len(vocab):
            raise ValueError("config.loss.lrc_negatives='vocab' needs a lexeme vocabulary (train_and_evaluate builds "
                             "it from the training split)")
        texts["lexeme_vocab"] = list(vocab.lexemes)
    consts = {}
    for name, strings in texts.items():
        tokens = trainer.tokenize(strings)
        if name == "lexeme_vocab":  # encoded exactly like the batch's lexemes (config.region.text_length)
            tokens = shorten_region_texts({"lexeme": tokens}, config.region.text_length)["lexeme"]
        if cache is not None:
            consts[f"{name}_embed"] = cache.lookup(tokens)
        else:
            consts[f"{name}_tokens"] = tokens
    return consts


# ----------------------------------------------------------------------------------------- preflight


def check_inputs(config: ml_collections.ConfigDict) -> None:
    """Stops at once, saying what to download and which command prepares it, if data or weights are missing (or
    what to install, if config.wandb asks for a missing package)."""
    metrics_writer.check_wandb(config.get("wandb"))
    if config.init.mode == "params":
        path = config.init.params_dir
        if not path or not ckpt_lib.is_params_checkpoint(path):
            raise FileNotFoundError(
                f"config.init.params_dir={path!r} is not a converted params checkpoint ({ckpt_lib.MODEL_FILE} + "
                f"params/). {config.init.hint or ''}".strip())
    datasets = {config.data.dataset: [config.data.train_split]}
    for ev in config.evals.values():
        datasets.setdefault(ev.dataset, []).append(ev.split)
    for dataset in datasets:
        entry = data_registry.lookup(dataset)
        if entry is not None and entry.generated:
            continue  # generated on first use
        import tensorflow_datasets as tfds

        data_registry.register(dataset)
        try:
            prepared = tfds.builder(dataset, data_dir=config.data.data_dir).is_prepared()
        except Exception:  # noqa: BLE001 - unknown name / config: same advice
            prepared = False
        if not prepared:
            raise FileNotFoundError(
                f"dataset {dataset!r} is not prepared in data_dir={config.data.data_dir!r}. Download the files "
                f"listed in docs/datasets.md, then build it with\n  "
                f"{data_registry.prepare_command(dataset, config.data.data_dir)}"
                "\nand pass --config.data.data_dir if it is not the TFDS default.")


# ------------------------------------------------------------------------------------------------ loop


class _StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now. Not KeyboardInterrupt: a finaliser (__del__) would swallow it,
            # and cleanup waits for an in-flight save. Exiting is as safe as kill -9: the latest finished checkpoint
            # stays, an unfinished one is a temporary directory that the next run ignores.
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            import multiprocessing

            for child in multiprocessing.active_children():  # grain workers: not orphaned when only we got it
                child.kill()
            os._exit(128 + signum)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then exiting",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


class _StepProfiler:
    """A jax.profiler trace of the train steps logged as `steps` (config.profile_steps) into `directory`. It starts
    before the first of them fetches its batch and stops after the last, once its outputs are computed: dispatch is
    asynchronous, so without that wait the trace would end before the device work it is for."""

    def __init__(self, steps: range, directory: pathlib.Path, enabled: bool = True):
        self.steps = steps if enabled else range(0)
        self.directory = directory
        self.active = False

    def before_step(self, step: int) -> None:
        """`step`: the number the coming step will be logged as."""
        if not self.active and step in self.steps:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.steps[-1]:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        """Ends the trace (also when the run stops inside the range), after `outputs` are ready."""
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile of steps {self.steps.start}..{self.steps.stop - 1} written to {self.directory} (open it "
                  "with TensorBoard's profile plugin or XProf: docs/training.md)", flush=True)


def _make_eval_picture(trainer: Trainer, config: ml_collections.ConfigDict,
                       data_config: ml_collections.ConfigDict) -> Callable[[Any], np.ndarray | None] | None:
    """The picture logged at each eval as `eval/picture` (TensorBoard, W&B): a function of the params that returns a
    uint8 (height, width, 3) image (`inference/eval_picture.py`: a held-out image's boxes labelled by the current
    weights and a similarity map), or None: off (`config.eval_picture`), nothing logs pictures, no eval split has
    boxes, or a multi-process run (the picture runs on one device, which cannot gather the global params)."""
    if not (config.eval_picture and config.evals and (config.tensorboard or config.wandb.project)) or \
            jax.process_count() > 1:
        return None
    from harmoclip_jax.inference.eval_picture import make_eval_picture

    return make_eval_picture(trainer.glue.merge, config, data_config.data_dir)


def _write_eval_picture(writer: metrics_writer.RunWriter, eval_picture: Callable | None, step: int, params) -> None:
    if eval_picture is None:
        return
    try:
        picture = eval_picture(params)
    except Exception as error:  # noqa: BLE001 - a picture for the logs must not end a training run
        print(f"warning: the eval picture of step {step} failed and is skipped ({type(error).__name__}: {error})",
              file=sys.stderr, flush=True)
        return
    if picture is not None:
        writer.write_image(step, "eval/picture", picture)


def _summary(trainer: Trainer, state) -> str:
    config = trainer.config
    params = state["params"]
    total = optim.count(params)
    trained = optim.count(params, trainer.train_mask)
    mesh = " x ".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
    device = jax.devices()[0]
    return (f"harmoclip_jax | method={config.method} model={config.model.variant} ({config.model.image_size}px) "
            f"dtype={config.model.dtype} | mesh {mesh} on {jax.device_count()} {device.platform} device(s), "
            f"{jax.process_count()} process(es) | params {total / 1e6:.2f}M, trained {trained / 1e6:.2f}M"
            f"{' (text tower frozen)' if trainer.text_frozen else ''} | batch {config.batch_size} x "
            f"{config.data.max_regions} boxes, {config.total_steps} steps, lr {config.optim.lr:g}")


def _throughput_fn(trainer: Trainer, cache_active: bool) -> Callable[[float], dict[str, float]]:
    """images/s -> the logged throughput: images/s, and on a TPU or GPU of a known kind (`accelerators.CHIPS`) the
    model TFLOP/s per device and the MFU they are of the chip's peak (the analytic count, as MaxText logs them)."""
    chip = accelerators.device_chip()
    if chip is None:
        return lambda rate: {"images_per_s": rate}
    flops = accelerators.model_flops_per_image(trainer, abstract_batch(trainer, cache_active))
    devices, peak = trainer.mesh.size, chip.peak(trainer.config.model.dtype)

    def throughput(rate: float) -> dict[str, float]:
        per_device = flops * rate / devices
        return {"images_per_s": rate, "tflops_per_device": per_device / 1e12, "mfu": per_device / peak}

    return throughput


def run_evals(evals: dict, params) -> dict[str, float]:
    out = {}
    for name, evaluator in evals.items():
        for metric, value in evaluator.run(params).items():
            out[f"eval/{name}/{metric}"] = value
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains (resuming from `workdir` if it has a checkpoint), evaluates and exports; returns the final metrics.
    Holds the workdir's lock throughout (process 0); a resume must keep the saved config (`resume.py`)."""
    workdir = pathlib.Path(workdir).absolute()
    with resume.WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, float]:
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    changes = resume.check_resume(workdir, config)  # before anything is written: a refusal changes nothing
    trainer = build_trainer(config)
    data_config = config_lib.data_config(config, jax.process_count())
    check_inputs(config)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    # metrics.jsonl, TensorBoard and W&B on process 0 (W&B's run starts here: a bad setting stops before training)
    writer = metrics_writer.open_run_writer(workdir, config, enabled=is_main)
    writer.write_config(config)
    if is_main:
        steps = workdir_lib.checkpoint_steps(workdir)
        resume.record(workdir, "resume" if changes is not None else "start", steps[-1] if steps else None, changes)

    from harmoclip_jax.data import lexeme_vocab, pipeline

    if jax.process_count() > 1:  # one process generates/opens every dataset first; none is written twice
        if is_main:
            pipeline.open_source(data_config.dataset, data_config.train_split, data_config.data_dir)
            for ev in config.evals.values():
                pipeline.open_source(ev.dataset, ev.split, data_config.data_dir)
        distributed.barrier(f"datasets_ready:{workdir}")
    train_iter = pipeline.make_train_iterator(data_config)
    checkpointer = ckpt_lib.TrainCheckpointer(workdir / workdir_lib.CHECKPOINTS, keep=config.checkpoint.keep,
                                              async_save=config.checkpoint.async_save,
                                              fail_save_at_step=config.debug.fail_save_at_step)
    with jax.set_mesh(trainer.mesh):
        latest, state = checkpointer.restore_latest(trainer.abstract_state, train_iter)
        writer.truncate_after(latest or 0)  # records and events after the checkpoint (or of a run that never saved) go
        if latest is not None:
            print(f"resumed from {checkpointer.directory} at step {latest}", flush=True)
        else:
            params = None
            if config.init.mode == "params":
                params = _load_init_params(trainer, config.init.params_dir)
            state = trainer.init_state(params)
    if is_main:
        print(_summary(trainer, state), flush=True)

    cache = make_text_cache(trainer, state["params"], workdir, data_config.dataset)
    batch_keys = device_batch_keys(trainer, cache is not None)
    class_names = []
    if "concept_embed" in trainer.needed and not config.region.concepts:
        class_names = list(evaluators.common.dataset_metadata(data_config.dataset, data_config.data_dir)
                           .get("class_names") or [])
    vocab = None
    if "lexeme_vocab_embed" in trainer.needed:
        vocab_file = workdir / workdir_lib.LEXEME_VOCAB
        vocab = lexeme_vocab.load_or_build(vocab_file, data_config.dataset, data_config.train_split,
                                           data_config.data_dir, config.region.lexeme_vocab_size,
                                           config.region.lexeme_vocab_min_count, write=is_main)
        if is_main:
            print(f"LRC against a vocabulary of {len(vocab)} lexemes ({vocab_file}); regions whose lexeme is outside "
                  "it do not enter the LRC term", flush=True)
    consts = make_consts(trainer, cache, class_names, vocab)
    context = evaluators.EvalContext(mesh=trainer.mesh, data_config=data_config, fns=trainer.eval_fns(),
                                     eval_batch_size=config.eval_batch_size)
    evals = {name: evaluators.build(name, ev, context) for name, ev in config.evals.items()}
    eval_picture = _make_eval_picture(trainer, config, data_config)
    profiler = _StepProfiler(config_lib.profile_steps(config), workdir / workdir_lib.PROFILE, enabled=is_main)

    step = int(jax.device_get(state["step"]))
    total = config.total_steps
    final_metrics: dict[str, float] = {}
    progress = None
    if is_main and config.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    last_log_time, last_log_step = time.perf_counter(), step
    throughput = _throughput_fn(trainer, cache is not None)
    distributed.barrier(f"train_start:{workdir}:{step}")  # processes enter the first collective together
    try:
        with jax.set_mesh(trainer.mesh), _StopRequest() as stop:
            while step < total:
                profiler.before_step(step + 1)
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):  # the profiler's step markers
                    local = next(train_iter)
                    batch = sharding.put_batch(prepare_batch(local, batch_keys, cache, config.region, vocab),
                                               trainer.mesh)
                    state, metrics = trainer.train_step(state, batch, consts)
                step += 1
                profiler.after_step(step, (state, metrics))
                metrics = jax.device_get(metrics)
                if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
                    checkpointer.wait()
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (loss={float(metrics['loss'])}, grad_norm="
                        f"{float(metrics['grad_norm'])}); training stopped without saving this state. The last good "
                        f"checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. Lower "
                        "config.optim.lr, enable/lower config.optim.grad_clip_norm, or check the data.")
                if progress is not None:
                    progress.update(1)
                record = None
                if step % config.log_every == 0 or step == total:
                    now = time.perf_counter()
                    rate = (step - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, step
                    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, **throughput(rate)}
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.1f}", refresh=False)
                if evals and (step % config.eval_every == 0 or step == total):
                    eval_metrics = run_evals(evals, state["params"])
                    _write_eval_picture(writer, eval_picture, step, state["params"])
                    final_metrics = eval_metrics
                    record = {**(record or {"step": step}), **eval_metrics}
                    if progress is not None:
                        progress.write(_format_evals(step, eval_metrics))
                    last_log_time = time.perf_counter()  # eval time is not training throughput
                if record is not None:
                    writer.write(record)
                stopping = stop.agreed()
                if step % config.checkpoint.every == 0 or step == total or stopping:
                    checkpointer.save(step, state, train_iter)
                    if cache is not None:
                        cache.save()
                if step == config.debug.kill_at_step:  # testing aid: die like `kill -9` (no cleanup at all)
                    os.kill(os.getpid(), signal.SIGKILL)
                if stopping:
                    checkpointer.wait()
                    print(f"stopped at step {step}; checkpoint saved in {checkpointer.directory}. Rerun the same "
                          "command to resume.", flush=True)
                    return final_metrics
            if not final_metrics and evals:  # resumed after the last step: evaluate the final state
                final_metrics = run_evals(evals, state["params"])
                writer.write({"step": step, **final_metrics})
                _write_eval_picture(writer, eval_picture, step, state["params"])
        checkpointer.wait()
        if config.checkpoint.export_params:
            export_params(trainer, state["params"], workdir / workdir_lib.PARAMS)
    except Exception as error:  # another process died: one line and exit now (the cleanup below would wait on it)
        distributed.exit_if_process_lost(error, workdir, step)
        raise
    finally:
        profiler.stop()  # a run that stopped inside config.profile_steps
        if progress is not None:
            progress.close()
        checkpointer.close()
        writer.close()
        closer = getattr(train_iter, "close", None)
        if closer is not None:
            closer()
    if is_main:
        if config.plot:
            from harmoclip_jax.plots import plot_metrics

            plot_metrics(workdir / workdir_lib.METRICS, workdir / workdir_lib.CURVES)
        if final_metrics:
            print(format_table(final_metrics), flush=True)
    return final_metrics


def _load_init_params(trainer: Trainer, directory: str):
    shardings = _flat(trainer.state_shardings["params"])
    model_config = trainer.glue.config
    model = ckpt_lib.load_params(directory, sharding=lambda p, _: shardings[sharding.path_str(p)],
                                 dtype=model_config.dtype, remat=model_config.remat)
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
    if registry.of_model(model) is not trainer.glue.backbone or \
            shapes(glue_lib.params_of(model)) != shapes(trainer.glue.abstract_params):
        raise ValueError(f"config.init.params_dir={directory} holds a {type(model).__name__} with config "
                         f"{model.config}, but the config asks for a {trainer.glue.backbone.family} model with "
                         f"{model_config}; convert it with matching --image_size or fix config.model")
    return glue_lib.params_of(model)


def export_params(trainer: Trainer, params, directory: pathlib.Path) -> pathlib.Path:
    """Writes the params-only export that `harmoclip_jax.checkpoint.load_params(directory)` loads in one call."""
    model = trainer.glue.merge(params)
    return ckpt_lib.save_params(model, directory, force=True)


def _format_evals(step: int, metrics: dict[str, float]) -> str:
    parts = [f"{k.removeprefix('eval/')}={v:.4f}" for k, v in metrics.items() if not k.endswith(("num_images",
             "num_captions", "num_boxes"))]
    return f"eval @ step {step}: " + "  ".join(parts)


def format_table(metrics: dict[str, float]) -> str:
    """A plain-text table of eval metrics (name, value)."""
    width = max(len(k) for k in metrics)
    lines = ["final evaluation", "-" * (width + 12)]
    for name, value in sorted(metrics.items()):
        text = f"{int(value)}" if name.endswith(("num_images", "num_captions", "num_boxes")) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {text:>8}")
    return "\n".join(lines)
