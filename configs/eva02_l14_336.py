"""FineCLIP's COCO protocol with an EVA02-CLIP-L/14 at 336 px (batch 80 and 5 boxes per image, as
configs/vitl14.py), initialised from a converted checkpoint. See configs/eva02_b16.py and configs/vitb16.py.

    python -m harmoclip_jax.convert --open_clip FILE --variant EVA02-L-14-336 --out checkpoints/eva02_l14_336
    python -m harmoclip_jax.main --config=configs/eva02_l14_336.py:dtype=bfloat16,remat --workdir=runs/eva02_l14
"""
import importlib.util
import pathlib

from harmoclip_jax import config_lib

_spec = importlib.util.spec_from_file_location("_eva02_b16", pathlib.Path(__file__).with_name("eva02_b16.py"))
_eva02_b16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eva02_b16)


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, method="harmoclip", res=336, epochs=10, params_dir="checkpoints/eva02_l14_336",
                               data_dir="", dtype="float32", remat=False, train_text=False, accum=1, boxes=5)
    return _eva02_b16.eva02_protocol(arg, "EVA02-L/14@336", "EVA02-L-14-336", batch_size=80, max_boxes=arg.boxes)
