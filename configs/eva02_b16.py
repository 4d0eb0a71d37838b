"""FineCLIP's COCO protocol (configs/vitb16.py) with an EVA02-CLIP-B/16 backbone, from a converted checkpoint.

    python -m harmoclip_jax.main --config=configs/eva02_b16.py --workdir=runs/eva02_b16
    python -m harmoclip_jax.main --config=configs/eva02_b16.py:method=fineclip,res=448 \\
        --config.init.params_dir=/ckpt/eva02_b16_448

Needs a converted checkpoint (open_clip's EVA02-B-16 weights, e.g. open_clip_pytorch_model.bin of
hf-hub:timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k, or the original EVA-CLIP release's
EVA02_CLIP_B_psz16_s8B.pt; the converter tells the two layouts apart):
    python -m harmoclip_jax.convert --open_clip FILE --variant EVA02-B-16 --out checkpoints/eva02_b16 [--image_size 448]
and the COCO datasets of configs/vitb16.py. Same optimiser, schedule, batch and boxes as the ViT-B/16 protocol.
"""
import importlib.util
import pathlib

from harmoclip_jax import config_lib

_spec = importlib.util.spec_from_file_location("_vitb16", pathlib.Path(__file__).with_name("vitb16.py"))
_vitb16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vitb16)


def eva02_protocol(arg, variant, open_clip_name, batch_size, max_boxes):
    c = _vitb16.coco_protocol(arg, variant, arg.res, arg.params_dir, batch_size=batch_size, max_boxes=max_boxes)
    c.model.family = "eva02_clip"
    c.init.hint = (f"Convert pretrained weights first: python -m harmoclip_jax.convert --open_clip "
                   f"/path/to/{open_clip_name}/open_clip_pytorch_model.bin --variant {open_clip_name} --out "
                   f"{arg.params_dir} --image_size {arg.res} (the original EVA-CLIP .pt also works), then pass "
                   "--config.init.params_dir.")
    return c


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, method="harmoclip", res=224, epochs=10, params_dir="checkpoints/eva02_b16",
                               data_dir="", dtype="float32", remat=False, train_text=False, accum=1)
    return eva02_protocol(arg, "EVA02-B/16", "EVA02-B-16", batch_size=256, max_boxes=20)
