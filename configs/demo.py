"""The demo: a small CLIP trained from scratch on the procedural scenes dataset, CPU-sized.

    python -m harmoclip_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m harmoclip_jax.main --config=configs/demo.py:smoke --workdir=/tmp/smoke   # < 1 min (CI)
    python -m harmoclip_jax.main --config=configs/demo.py:method=clip                   # GC-only baseline

Everything (dataset generation, training, evaluation, checkpoint) runs in a few minutes on 2 CPU cores. The
text tower trains too (a random frozen text tower would give meaningless class prompts).
"""
from harmoclip_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, method="harmoclip", smoke=False, steps=0, noeval=False, lrc_text="lexeme",
                               lrc_source="region_caption")
    c = config_lib.base_config()
    config_lib.set_method(c, arg.method)
    config_lib.set_lrc_text(c, arg.lrc_text, arg.lrc_source)
    c.model.variant = "ViT-Ti/8@64"
    c.model.image_size = 64
    c.model.context_length = 48  # scenes captions need <= 46 tokens
    c.data.dataset = "scenes/small"
    c.data.max_regions = 4
    c.region.text_length = 12  # region captions <= 10 tokens + start/end, lexemes <= 4: no need for 48 positions
    # A batch's 256 lexemes hold at most the 36 class lexemes: each distinct one is encoded once (same loss; the
    # text tower's lexeme work drops ~5x). Region captions repeat far less (~200 distinct in 256): encoded as they are.
    c.region.distinct_lexemes = 48
    c.data.eval_max_regions = 4
    c.data.read_threads = 2
    c.data.read_buffer_size = 512
    c.batch_size = 64
    c.eval_batch_size = 200
    c.total_steps = arg.steps or 400
    c.log_every = 10
    c.eval_every = 200
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.optim.freeze_text_tower = False  # from scratch: both towers train
    c.checkpoint.every = 200
    c.evals.retrieval = dict(type="retrieval", dataset="scenes/small", split="val")
    c.evals.boxcls = dict(type="box_classification", dataset="scenes/small", split="val")
    if arg.smoke:
        c.model.variant = "test-tiny"
        c.data.dataset = "scenes/tiny"
        c.batch_size = 16
        c.eval_batch_size = 72
        # 4 batches read ahead: a 4-step run decodes about what it trains on (512 examples ahead decoded ~1 s of
        # images per run that no step used; the suite starts ~85 smoke runs).
        c.data.read_buffer_size = 64
        c.total_steps = arg.steps or 4
        c.log_every = 1
        c.eval_every = 4
        c.optim.warmup_steps = 1
        c.checkpoint.every = 2
        for ev in c.evals.values():
            ev.dataset = "scenes/tiny"
    if arg.noeval:
        c.evals = {}
    return c
