"""Experiment configs: the big_vision-style argument mini-language, loading by path, and `validate`.

A config file is a Python module with `get_config(arg: str | None) -> ml_collections.ConfigDict`. The argument
string after the path (`configs/vitb16.py:method=fineclip,res=336`) is parsed by `parse_arg` against the
file's defaults: `key=value` pairs separated by commas, a bare `key` means True, and a single unnamed value fills
the first default. Values take the type of their default.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import ml_collections
import numpy as np
from absl import flags as absl_flags

from harmoclip_jax import losses
from harmoclip_jax.sharding import mesh_shape

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in _BOOL:
            raise ValueError(f"config argument {key}={text!r}: expected true/false")
        return _BOOL[text.lower()]
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ValueError(f"config argument {key}={text!r}: expected a {type(default).__name__}") from None
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"a=1,b,c=x"` against `defaults` (which fix the allowed keys and their types).

    `parse_arg("method=clip,smoke", method="harmoclip", smoke=False)` -> {method: "clip", smoke: True}.
    """
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    parts = [p.strip() for p in arg.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0] and parts[0] not in defaults and defaults:
        first = next(iter(defaults))  # a single unnamed value fills the first key
        parts = [f"{first}={parts[0]}"]
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; this config accepts: "
                             f"{', '.join(f'{k}={v!r}' for k, v in defaults.items())}")
        if not eq:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            result[key] = True
        else:
            result[key] = _convert(key, value.strip(), defaults[key])
    return result


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` the way `--config` does (for notebooks and tests)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path} (relative to {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location(f"_harmoclip_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def define_config_flag(name: str, default: str | None, help_string: str, flag_values=None,
                       sys_argv: list[str] | None = None):
    """ml_collections' `--NAME=FILE[:ARGS]` flag with its `--NAME.a.b=VALUE` overrides, the file read by
    `load_config` (ml_collections' own loader calls `SourceFileLoader.load_module()`, deprecated and warned about under
    Python 3.12). The default is set once the parser is in place: setting it parses it, unless the command line
    names a file. Returns the flag's holder."""
    from ml_collections import config_flags

    flag_values = absl_flags.FLAGS if flag_values is None else flag_values
    holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values, sys_argv=sys_argv)
    flag_values[name].parser = _ConfigFileParser()
    if default is not None:
        flag_values.set_default(name, default)
    return holder


class _ConfigFileParser(absl_flags.ArgumentParser):
    """Parses a `FILE[:ARGS]` config flag's value into the locked config."""

    def parse(self, argument: str) -> ml_collections.ConfigDict:
        try:
            config = load_config(argument)
        except FileNotFoundError as error:  # absl reports a ValueError as the flag's one-line error
            raise ValueError(f"{error}; e.g. --config=configs/demo.py from the repository root") from error
        config.lock()
        return config

    def flag_type(self) -> str:
        return "config object"


# ------------------------------------------------------------------------------------------------ validate

METHODS = losses.METHODS
# Pipeline fields that other sections decide; `data_config(config)` fills them, so they are set once.
DERIVED_DATA_FIELDS = {
    "image_size": "config.model.image_size", "context_length": "config.model.context_length",
    "image_mean": "the backbone family", "image_std": "the backbone family", "tokenizer": "the backbone family",
    "batch_size": "config.batch_size (global)", "eval_batch_size": "config.eval_batch_size (global)",
    "lexeme_spans": "config.loss.lrc_text / lrc_token_source",
}
# Token-level LRC (config.loss.lrc_text="tokens"): the batch key whose token rows the lexeme spans index, by
# config.loss.lrc_token_source.
LEXEME_SPAN_SOURCES = {"region_caption": "region_text", "caption": "text"}


def token_lrc(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's LRC term pools lexeme embeddings from caption tokens (`config.loss.lrc_text="tokens"`)."""
    return config.loss.get("lrc_text", "lexeme") == "tokens" and float(config.loss.weights.get("lrc", 0.0)) != 0.0


def model_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.model` completed with today's defaults (configs saved before a field existed lack it)."""
    model = base_config().model
    model.update(dict(config.model))
    return model


def backbone(config: ml_collections.ConfigDict):
    """The `Backbone` record of `config.model.family`."""
    from harmoclip_jax.models import registry

    return registry.get(model_section(config).family)


def tokenizer_name(config: ml_collections.ConfigDict) -> str:
    """The `tokenizer.get_tokenizer` name of the run: the family's tokenizer, given `config.model.tokenizer_file`
    (optional; the siglip family's SentencePiece model, e.g. the checkpoint's spiece.model) as its argument."""
    file = model_section(config).get("tokenizer_file")
    return f"{backbone(config).tokenizer}:{file}" if file else backbone(config).tokenizer


def data_config(config: ml_collections.ConfigDict, process_count: int = 1) -> ml_collections.ConfigDict:
    """The pipeline's config: `config.data` plus what the model decides (input size, text context, pixel
    normalisation, tokenizer) and the per-process batch sizes."""
    model, family = model_section(config), backbone(config)
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.image_size = model.image_size
    data.context_length = model.context_length
    data.image_mean, data.image_std = tuple(family.image_mean), tuple(family.image_std)
    data.tokenizer = tokenizer_name(config)
    data.batch_size = config.batch_size // process_count
    data.eval_batch_size = config.eval_batch_size // process_count
    data.lexeme_spans = LEXEME_SPAN_SOURCES[config.loss.get("lrc_token_source", "region_caption")] \
        if token_lrc(config) else ""
    return data


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int = 1) -> None:
    """Rejects bad configs with a message that says which field to change, before anything compiles."""
    family = backbone(config)  # raises for an unknown family
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r} is unknown; choose one of {METHODS}")
    if config.data.get("image_dtype", "float32") not in ("float32", "uint8"):
        raise ValueError(f"config.data.image_dtype={config.data.image_dtype!r}; use 'float32' (normalised on the host) "
                         "or 'uint8' (raw pixels, normalised on the device)")
    canvas = config.data.get("resize_canvas", 0)
    if canvas and (config.data.get("image_dtype", "float32") != "uint8" or canvas < config.model.image_size):
        raise ValueError(f"config.data.resize_canvas={canvas} needs config.data.image_dtype='uint8' (the device "
                         f"resizes raw pixels) and a canvas of at least config.model.image_size="
                         f"{config.model.image_size} pixels; set resize_canvas=0 to resize on the host")
    losses.validate_loss_config(config.loss)
    if token_lrc(config) and not callable(getattr(family.model_class, "encode_text_tokens", None)):
        raise ValueError(f"config.loss.lrc_text='tokens' needs per-token text embeddings (encode_text_tokens), which "
                         f"the {family.family!r} family (config.model.family) does not provide; use lrc_text='lexeme'")
    if config.loss.lrc_negatives == "vocab" and (config.region.lexeme_vocab_size <= 0
                                                 or config.region.lexeme_vocab_min_count <= 0):
        raise ValueError(f"config.loss.lrc_negatives='vocab' keeps the config.region.lexeme_vocab_size="
                         f"{config.region.lexeme_vocab_size} most frequent training lexemes seen at least "
                         f"config.region.lexeme_vocab_min_count={config.region.lexeme_vocab_min_count} times; both "
                         "must be positive")
    for name in ("total_steps", "batch_size"):
        if int(config[name]) <= 0:
            raise ValueError(f"config.{name}={config[name]} must be positive")
    if num_devices is not None:
        names, sizes = mesh_shape(config.mesh, num_devices)
        if config.batch_size % num_devices:
            raise ValueError(f"config.batch_size={config.batch_size} (global) is not divisible by the "
                             f"{num_devices} devices of the data x fsdp mesh {dict(zip(names, sizes))}")
        accum = int(config.optim.grad_accum_steps)
        if accum < 1 or config.batch_size % (accum * num_devices):
            raise ValueError(f"config.optim.grad_accum_steps={accum}: the global batch {config.batch_size} must "
                             f"split into {accum} micro-batches divisible by the {num_devices} devices")
        if config.eval_batch_size % num_devices:
            raise ValueError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by the "
                             f"{num_devices} devices")
    if config.batch_size % process_count or config.eval_batch_size % process_count:
        raise ValueError(f"batch_size={config.batch_size} and eval_batch_size={config.eval_batch_size} must be "
                         f"divisible by the {process_count} processes")
    for pattern_list in ("freeze", "no_decay"):
        for pattern in config.optim[pattern_list]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"config.optim.{pattern_list}: bad regex {pattern!r}: {error}") from None
    from harmoclip_jax.evaluators import EVALUATORS

    for name, eval_config in config.evals.items():
        if eval_config.type not in EVALUATORS:
            raise ValueError(f"config.evals.{name}.type={eval_config.type!r}; known evaluators: {sorted(EVALUATORS)}")
    family.get_config(config.model.variant, dtype=config.model.dtype)  # unknown variant / dtype: the family says
    if config.init.mode not in ("scratch", "params"):
        raise ValueError(f"config.init.mode={config.init.mode!r}; use 'scratch' or 'params' (a converted "
                         "checkpoint directory in config.init.params_dir)")
    if config.init.mode == "scratch" and config.init.params_dir:
        raise ValueError(f"config.init.params_dir={config.init.params_dir!r} is set but config.init.mode='scratch' "
                         "ignores it; add --config.init.mode=params to start from it, or drop params_dir")
    for field, source in DERIVED_DATA_FIELDS.items():
        if field in config.data:
            raise ValueError(f"config.data.{field} is set, but {source} decides it; remove config.data.{field}")
    for field in ("distinct_lexemes", "distinct_region_texts"):
        bound = int(config.region[field])
        if bound and (bound < 0 or int(config.optim.grad_accum_steps) > 1):
            raise ValueError(f"config.region.{field}={bound} must be >= 0 and works without gradient accumulation "
                             "(config.optim.grad_accum_steps=1); set it to 0")
        if bound and num_devices is not None and bound % max(num_devices // process_count, 1):
            raise ValueError(f"config.region.{field}={bound} must be divisible by the "
                             f"{num_devices // process_count} devices of each process")
    if config.log_every <= 0 or config.checkpoint.every <= 0:
        raise ValueError("config.log_every and config.checkpoint.every must be positive")
    profile_steps(config)  # raises for a bad config.profile_steps
    mode = (config.get("wandb") or {}).get("mode", "online")
    if mode not in WANDB_MODES:
        raise ValueError(f"config.wandb.mode={mode!r}; use one of {WANDB_MODES}")


WANDB_MODES = ("online", "offline", "disabled")


def profile_steps(config: ml_collections.ConfigDict) -> range:
    """The steps `config.profile_steps` = (start, stop) traces: those logged as start..stop-1 (empty: none)."""
    steps = tuple(config.get("profile_steps") or ())
    if not steps:
        return range(0)
    if len(steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps) or \
            not 1 <= steps[0] < steps[1]:
        raise ValueError(f"config.profile_steps={config.profile_steps!r} must be (start, stop) with 1 <= start < "
                         "stop, tracing the steps start..stop-1, e.g. --config.profile_steps='(10, 13)'; () traces "
                         "none")
    return range(*steps)


# ------------------------------------------------------------------------------------------- base config


def base_config(method: str = "harmoclip") -> ml_collections.ConfigDict:
    """Every field the trainer reads, with neutral defaults; config files change what they need."""
    from harmoclip_jax.data.pipeline import default_data_config

    placeholder = ml_collections.config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 256  # global, over all processes and devices
    c.eval_batch_size = 256  # global
    c.log_every = 10
    c.eval_every = 500  # also at the end
    c.progress_bar = True
    c.plot = True
    # Run logging (process 0; docs/training.md "Logging and profiling"): every metrics.jsonl record also goes to
    # TensorBoard event files in workdir/tensorboard/, and to Weights & Biases when wandb.project is set (needs
    # `pip install wandb`; mode "online", "offline" or "disabled"; entity and name: W&B's defaults when empty).
    c.tensorboard = True
    # At each eval, a picture for TensorBoard / W&B: a held-out image's boxes labelled by the current weights and a
    # similarity map (inference/eval_picture.py; single-process runs).
    c.eval_picture = True
    c.wandb = ml_collections.ConfigDict({"project": "", "entity": "", "name": "", "mode": "online"})
    # (start, stop): a jax.profiler trace of the train steps logged as start..stop-1 into workdir/profile/; () = none.
    c.profile_steps = ()

    c.model = ml_collections.ConfigDict()
    c.model.family = "clip"  # backbone family (harmoclip_jax/models/registry.py)
    c.model.variant = "ViT-B/16"  # a variant of that family
    c.model.image_size = 224
    c.model.context_length = 77
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay float32)
    c.model.remat = False
    c.model.attention_impl = "auto"  # cuDNN for bf16 on GPUs, XLA elsewhere

    c.init = ml_collections.ConfigDict()
    c.init.mode = "scratch"  # or "params": a converted checkpoint (python -m harmoclip_jax.convert)
    c.init.params_dir = placeholder(str)
    c.init.hint = ""  # what to run to get the checkpoint (shown when it is missing)

    c.data = default_data_config()
    for field in DERIVED_DATA_FIELDS:  # set from the model and the global sizes (`data_config`)
        del c.data[field]
    c.data.max_regions = 20
    c.loss = losses.default_loss_config(method)

    c.region = ml_collections.ConfigDict()
    c.region.output_size = 1  # RoIAlign bins per side, averaged into one region embedding (FineCLIP: 1)
    c.region.sampling_ratio = -1  # torchvision's adaptive sampling (FineCLIP)
    c.region.crop_scale = 1.5  # crops for fineclip/clipself: boxes enlarged 1.5x about their centre
    c.region.text_length = placeholder(int)  # encode region captions/lexemes from this many tokens (None: all)
    # At most this many distinct lexemes / region captions per process batch, each encoded once (0: encode every
    # text; a batch with more is an error). Used while the text tower trains (a frozen one is cached instead).
    c.region.distinct_lexemes = 0
    c.region.distinct_region_texts = 0
    c.region.concepts = ()  # RegionCLIP concept names; empty = the training dataset's class_names
    c.region.concept_template = "a photo of a {}."
    # LRC with lrc_negatives="vocab": the most frequent training-split lexemes (workdir/lexeme_vocab.json)
    c.region.lexeme_vocab_size = 10000
    c.region.lexeme_vocab_min_count = 1

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 1000
    c.optim.end_lr_fraction = 0.0
    c.optim.grad_clip_norm = 1.0  # 0 disables
    c.optim.freeze_text_tower = True  # the backbone's text tower (FineCLIP/CLIPSelf protocol)
    # Sequences are tuples so `--config.optim.freeze="('visual/conv1.*',)"` works from the command line
    # (ml_collections cannot override list fields); assigning a list in a config file is fine (it becomes a tuple).
    c.optim.freeze = ()  # more regexes of frozen parameter paths
    c.optim.no_decay = ()  # regexes of parameters without weight decay, on top of the backbone's own
    c.optim.grad_accum_steps = 1  # micro-batches per step (each its own contrastive batch)
    c.optim.max_logit_scale = float(np.log(100.0))

    c.mesh = (("data", -1), ("fsdp", 1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = ((".*", "fsdp"),)
    c.sharding.fsdp_min_size_mb = 4.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.export_params = True  # params-only export to workdir/params at the end

    c.text_cache = ml_collections.ConfigDict()
    c.text_cache.enabled = True  # used only when the whole text tower is frozen
    c.text_cache.dir = placeholder(str)  # default: workdir/text_cache

    c.evals = ml_collections.ConfigDict()
    # Rerunning a workdir with checkpoints refuses config changes that alter the saved state's meaning
    # (harmoclip_jax/resume.py: HARMLESS lists what may change); name fields or sections here to accept them, e.g.
    # --config.resume.allow_changes="('optim.lr',)". Accepted changes go to workdir/config_history.jsonl.
    c.resume = ml_collections.ConfigDict()
    c.resume.allow_changes = ()
    c.debug = ml_collections.ConfigDict()
    c.debug.inject_nan_at_step = -1  # testing aid: makes the loss of that step NaN
    c.debug.kill_at_step = -1  # testing aid: SIGKILLs the process after that step (an async save may be in flight)
    c.debug.fail_save_at_step = -1  # testing aid: the checkpoint save of that step fails like a full disk (ENOSPC)
    return c


# The config-file arguments (`--config=FILE:ARG=VALUE`) that set the optional loss fields: a command-line override
# cannot name a field the config lacks, so the error for `--config.loss.<field>` points here.
OPTIONAL_LOSS_ARGS = {  # field -> (argument, the config files that take it)
    "lrc_text": ("lrc_text", ("configs/demo.py", "configs/vitb16.py")),
    "lrc_token_source": ("lrc_source", ("configs/demo.py", "configs/vitb16.py")),
    "global_form": ("global_form", ("configs/siglip_b16.py",)),
}


def set_lrc_text(config: ml_collections.ConfigDict, text: str = "lexeme", source: str = "region_caption") -> None:
    """Sets the optional `config.loss.lrc_text` / `lrc_token_source` (the `lrc_text=`, `lrc_source=` arguments of the
    config files; absent from default configs, so command-line overrides need them set here first)."""
    if text != "lexeme" or source != "region_caption":
        config.loss.lrc_text, config.loss.lrc_token_source = text, source


def set_method(config: ml_collections.ConfigDict, method: str) -> None:
    """Switches the loss family (`method=` argument of the config files)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}")
    config.method = method
    config.loss = losses.default_loss_config(method)
