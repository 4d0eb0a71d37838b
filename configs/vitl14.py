"""FineCLIP's COCO protocol with a ViT-L/14 CLIP at 336 px (batch 80 and 5 boxes per image, as FineCLIP's L/14
script), initialised from a converted checkpoint. See configs/vitb16.py for what to download and prepare.

    python -m harmoclip_jax.main --config=configs/vitl14.py:dtype=bfloat16,remat --workdir=runs/vitl14
"""
import importlib.util
import pathlib

from harmoclip_jax import config_lib

_spec = importlib.util.spec_from_file_location("_vitb16", pathlib.Path(__file__).with_name("vitb16.py"))
_vitb16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vitb16)


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, method="harmoclip", res=336, epochs=10, params_dir="checkpoints/vitl14_336",
                               data_dir="", dtype="float32", remat=False, train_text=False, accum=1, boxes=5)
    variant = "ViT-L/14@336" if arg.res == 336 else "ViT-L/14"
    return _vitb16.coco_protocol(arg, variant, arg.res, arg.params_dir, batch_size=80, max_boxes=arg.boxes)
