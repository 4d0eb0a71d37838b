"""Convert pretrained weights into a harmoclip_jax params checkpoint (Orbax), or export ours back.

    python -m harmoclip_jax.convert --hf DIR --out CKPT_DIR [--image_size 336]
    python -m harmoclip_jax.convert --open_clip FILE --variant ViT-B/16 [--family clip] --out CKPT_DIR
    python -m harmoclip_jax.convert --open_clip EVA02_B_16.pt --variant EVA02-B-16 --out CKPT_DIR  # EVA02-CLIP
    python -m harmoclip_jax.convert --params CKPT_DIR --to_hf HF_DIR      # for PyTorch users of our weights

The backbone family comes from the Hugging Face config.json (--hf), the params checkpoint (--params) or --family
(--open_clip; default: the family whose variant table names --variant). For CLIP, --to_hf writes a complete
transformers directory: CLIPModel weights + config, our CLIP tokenizer files and a CLIPImageProcessor config
reproducing our preprocessing (load with CLIPProcessor.from_pretrained(HF_DIR, backend="pil") for pixels identical
to ours; see models.convert.save_hf_clip).
"""
from __future__ import annotations

import pathlib
import time

from absl import flags

from harmoclip_jax import cli

_HF = flags.DEFINE_string("hf", None, "Hugging Face CLIPModel directory (config.json + weights).")
_OPEN_CLIP = flags.DEFINE_string("open_clip", None, "open_clip / OpenAI state dict (.pt, .bin, .safetensors).")
_PARAMS = flags.DEFINE_string("params", None, "A harmoclip_jax params checkpoint to export (with --to_hf).")
_VARIANT = flags.DEFINE_string("variant", None, "Architecture of an --open_clip file, e.g. ViT-B/16.")
_FAMILY = flags.DEFINE_string("family", None, "Backbone family of an --open_clip file (models/registry.py); default: "
                              "the family of --variant (ViT-B/16: clip, EVA02-B-16: eva02_clip).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Target image size; resizes the position embedding.")
_OUT = flags.DEFINE_string("out", None, "Output params checkpoint directory.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Output Hugging Face directory (export): model, tokenizer and processor "
                             "files.")
_TOKENIZER_FILE = flags.DEFINE_string("tokenizer_file", None, "SigLIP: the SentencePiece model (spiece.model) to "
                                      "copy into the outputs (default: the --hf / --params directory's own).")
_FORCE = flags.DEFINE_bool("force", False, "Overwrite a non-empty output directory.")
flags.DEFINE_alias("open-clip", "open_clip")
flags.DEFINE_alias("image-size", "image_size")
flags.DEFINE_alias("to-hf", "to_hf")


def _usage_error(message: str) -> None:
    raise cli.UsageError(f"{message} (usage: python -m harmoclip_jax.convert --help)")


def main(argv) -> None:
    if len(argv) > 1:
        _usage_error(f"unexpected arguments {argv[1:]}")
    sources = [s for s in (_HF.value, _OPEN_CLIP.value, _PARAMS.value) if s]
    if len(sources) != 1:
        _usage_error("give exactly one of --hf, --open_clip, --params")
    from harmoclip_jax import checkpoint
    from harmoclip_jax.models import glue, registry

    overrides = {"image_size": _IMAGE_SIZE.value} if _IMAGE_SIZE.value else {}
    start = time.time()
    if _HF.value:
        backbone = registry.for_hf_dir(_HF.value)
        model = backbone.load_hf(_HF.value, **overrides)
        what = f"Hugging Face {backbone.hf_architecture} {_HF.value}"
    elif _OPEN_CLIP.value:
        if not _VARIANT.value:
            _usage_error("--open_clip needs --variant (e.g. ViT-B/16)")
        backbone = registry.get(_FAMILY.value) if _FAMILY.value else registry.for_variant(_VARIANT.value)
        if backbone.load_open_clip is None:
            _usage_error(f"the {backbone.family} family has no open_clip converter")
        model = backbone.load_open_clip(_OPEN_CLIP.value, _VARIANT.value, **overrides)
        what = f"open_clip state dict {_OPEN_CLIP.value} ({_VARIANT.value})"
    else:
        model = checkpoint.load_params(_PARAMS.value, **overrides)
        backbone = registry.of_model(model)
        what = f"params checkpoint {_PARAMS.value}"
    v, t = model.config.vision, model.config.text
    print(f"loaded {what}: {glue.count_params(model):,} parameters; {backbone.family} family, patch {v.patch_size} @ "
          f"{v.image_size}px, text context {t.context_length} ({time.time() - start:.1f}s)")
    if _IMAGE_SIZE.value:
        print(f"position embedding resized (bicubic) to the {v.image_size // v.patch_size}x"
              f"{v.image_size // v.patch_size} grid")
    if not (_OUT.value or _TO_HF.value):
        _usage_error("give --out (params checkpoint) and/or --to_hf (Hugging Face directory)")
    # Families whose tokenizer ships with the weights (SigLIP's spiece.model): --tokenizer_file, else the source
    # directory's own copy travels into the outputs.
    tokenizer_file = _TOKENIZER_FILE.value
    source_dir = _HF.value or _PARAMS.value
    if not tokenizer_file and backbone.tokenizer_file and source_dir:
        candidate = pathlib.Path(source_dir) / backbone.tokenizer_file
        tokenizer_file = str(candidate) if candidate.is_file() else None
    extra = {"tokenizer_file": tokenizer_file} if tokenizer_file and backbone.tokenizer_file else {}
    if _OUT.value:
        path = checkpoint.save_params(model, _OUT.value, force=_FORCE.value, **extra)
        print(f"wrote params checkpoint {path}  (load: harmoclip_jax.checkpoint.load_params({str(path)!r}))"
              + (f"; tokenizer {path / backbone.tokenizer_file}" if extra else ""))
    if _TO_HF.value:
        if backbone.save_hf is None:
            _usage_error(f"the {backbone.family} family has no Hugging Face export")
        path = backbone.save_hf(model, _TO_HF.value, **extra)
        print(f"wrote Hugging Face {backbone.hf_architecture} + processor {path}  (load: transformers."
              f"{backbone.hf_architecture}.from_pretrained({str(path)!r}), AutoProcessor.from_pretrained("
              f"{str(path)!r}, backend='pil'))")


if __name__ == "__main__":
    cli.run_absl(main)
