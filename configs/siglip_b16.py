"""FineCLIP's COCO protocol (configs/vitb16.py) with a SigLIP B/16 (google/siglip-base-patch16-*) and the sigmoid
global loss, from a converted checkpoint.

    python -m harmoclip_jax.main --config=configs/siglip_b16.py --workdir=runs/siglip_b16
    python -m harmoclip_jax.main --config=configs/siglip_b16.py:res=256,hf_dir=/ckpt/siglip-base-patch16-256 \\
        --config.init.params_dir=/ckpt/siglip_b16_256 --config.data.data_dir=/data/tfds

Needs, besides the COCO datasets of configs/vitb16.py:
  * a converted checkpoint: python -m harmoclip_jax.convert --hf HF_DIR --out PARAMS_DIR (a HF SiglipModel
    directory; an open_clip file works too: --open_clip FILE --variant ViT-B-16-SigLIP);
  * its SentencePiece model: the conversion copies HF_DIR/spiece.model into PARAMS_DIR, which is where
    `config.model.tokenizer_file` points (the pipeline, the trainer's evaluators and the workdir's Predictor
    tokenize with it). An open_clip file has none: copy the matching spiece.model there.
Text: 64 tokens (SigLIP pads every text to 64). Global term: SigLIP's sigmoid loss (`config.loss.global_form`;
"softmax" gives CLIP's InfoNCE on SigLIP features); region terms keep their softmax form.
"""
import importlib.util
import math
import pathlib

from harmoclip_jax import config_lib

_spec = importlib.util.spec_from_file_location("_vitb16", pathlib.Path(__file__).with_name("vitb16.py"))
_vitb16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vitb16)

VARIANTS = {224: "SigLIP-B/16", 256: "SigLIP-B/16@256", 384: "SigLIP-B/16@384"}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, method="harmoclip", res=224, epochs=10, params_dir="", hf_dir="",
                               data_dir="", dtype="float32", remat=False, train_text=False, accum=1,
                               global_form="sigmoid")
    if arg.res not in VARIANTS:
        raise ValueError(f"res={arg.res}: SigLIP B/16 comes at {sorted(VARIANTS)}")
    hf_dir = arg.hf_dir or f"checkpoints/hf/siglip-base-patch16-{arg.res}"
    params_dir = arg.params_dir or f"checkpoints/siglip_b16_{arg.res}"
    c = _vitb16.coco_protocol(arg, VARIANTS[arg.res], arg.res, params_dir, batch_size=256, max_boxes=20)
    c.model.family = "siglip"
    c.model.context_length = 64
    c.model.tokenizer_file = f"{params_dir}/spiece.model"  # convert --hf copies it there
    c.loss.global_form = arg.global_form
    # CLIP's clamp exp(logit_scale) <= 100 would cut the released SigLIPs' scale (~117) at the first step; big_vision
    # does not clamp, so only a loose guard stays.
    c.optim.max_logit_scale = math.log(1000.0)
    c.init.hint = (f"Convert the pretrained weights first: python -m harmoclip_jax.convert --hf {hf_dir} --out "
                   f"{params_dir} (a HF SiglipModel directory, e.g. google/siglip-base-patch16-{arg.res}; its "
                   "spiece.model is the tokenizer), then pass --config.init.params_dir if you changed it.")
    return c
