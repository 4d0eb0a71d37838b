"""FineCLIP's COCO protocol (docs/method.md, "Evaluation protocol") with a ViT-B/16 CLIP, from a converted checkpoint.

    python -m harmoclip_jax.main --config=configs/vitb16.py --workdir=runs/vitb16
    python -m harmoclip_jax.main --config=configs/vitb16.py:method=fineclip,res=336 \\
        --config.init.params_dir=/ckpt/vitb16_336 --config.data.data_dir=/data/tfds

Needs (see docs/datasets.md):
  * a converted checkpoint: python -m harmoclip_jax.convert --hf DIR --out /ckpt/vitb16 [--image_size 336]
  * COCO train (region captions), COCO val2017 retrieval and COCO panoptic val2017 built with
    python -m harmoclip_jax.data.prepare --dataset {coco_train,coco_retrieval,coco_panoptic} --manual_dir ...
AdamW lr 1e-5, betas (0.9, 0.98), eps 1e-6, wd 0.1, cosine with 1k warmup, batch 256, 20 boxes per image,
10 epochs of COCO train2017 (118,287 images -> 4,620 steps), text tower frozen.
"""
from harmoclip_jax import config_lib

COCO_TRAIN_IMAGES = 118_287


def coco_protocol(arg, variant, res, params_dir, batch_size, max_boxes):
    c = config_lib.base_config()
    config_lib.set_method(c, arg.method)
    config_lib.set_lrc_text(c, arg.get("lrc_text", "lexeme"), arg.get("lrc_source", "region_caption"))
    c.model.variant = variant
    c.model.image_size = res
    c.model.dtype = arg.dtype
    c.model.remat = arg.remat
    c.init.mode = "params"
    c.init.params_dir = params_dir
    c.init.hint = (f"Convert pretrained weights first, e.g. python -m harmoclip_jax.convert --hf "
                   f"/path/to/hf/clip-{variant.lower().replace('/', '')} --out {params_dir} --image_size {res} "
                   "(or --open_clip FILE --variant ...), then pass --config.init.params_dir.")
    c.data.dataset = "coco_region_captions/proposals"
    c.data.data_dir = arg.data_dir or None
    c.data.max_regions = max_boxes
    c.data.eval_max_regions = 100
    c.data.num_workers = 4
    c.data.image_dtype = "uint8"  # raw pixels to the device, normalised there: 4x less host work and transfer
    # On hosts short of CPU for the accelerator's rate, --config.data.resize_canvas=C also moves the bicubic squash
    # to the device (benchmarks/RESULTS.md, pipeline_jpeg): C = 640 holds any COCO image after the JPEG draft, 320
    # the 640x480 ones (a smaller canvas is cheaper on the host; larger pictures are squashed there).
    c.batch_size = batch_size
    c.eval_batch_size = 256  # divides every data-parallel size up to a v5e-256 (docs/accelerators.md)
    c.total_steps = arg.epochs * COCO_TRAIN_IMAGES // batch_size
    c.optim.lr = 1e-5
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 1000
    c.optim.freeze_text_tower = not arg.train_text
    c.optim.grad_accum_steps = arg.accum
    c.region.text_length = 32  # BLIP-2 region captions are short; checked per batch
    c.log_every = 50
    c.eval_every = COCO_TRAIN_IMAGES // batch_size  # once per epoch
    c.checkpoint.every = 500
    c.evals.retrieval = dict(type="retrieval", dataset="coco_retrieval", split="val")
    c.evals.boxcls = dict(type="box_classification", dataset="coco_panoptic_boxes", split="val", max_regions=100)
    return c


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, method="harmoclip", res=224, epochs=10, params_dir="checkpoints/vitb16",
                               data_dir="", dtype="float32", remat=False, train_text=False, accum=1,
                               lrc_text="lexeme", lrc_source="region_caption")
    return coco_protocol(arg, "ViT-B/16", arg.res, arg.params_dir, batch_size=256, max_boxes=20)
