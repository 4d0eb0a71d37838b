"""Shared pieces of the trainer tests: a tiny config, synthetic batches (no dataset needed) and the environment
of subprocess runs."""
import os
import pathlib

import numpy as np

from harmoclip_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EOT = 49407
SOT = 49406


def tiny_config(method="harmoclip", batch_size=16, **optim):
    c = config_lib.base_config(method)
    c.model.variant = "test-tiny"
    c.model.image_size = 64
    c.model.context_length = 16
    c.data.max_regions = 3
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    c.total_steps = 10
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.freeze_text_tower = False
    c.sharding.fsdp_min_size_mb = 0.0  # shard even tiny arrays, so fsdp meshes really split parameters
    c.optim.update(optim)
    return c


def _tokens(rng, shape, vocab=400):
    tokens = rng.integers(1, vocab, size=(*shape, 16)).astype(np.int32)
    lengths = rng.integers(3, 12, size=shape)
    tokens[..., 0] = SOT
    for idx in np.ndindex(*shape):
        tokens[idx][lengths[idx]] = EOT
        tokens[idx][lengths[idx] + 1:] = 0
    return tokens


def synthetic_batch(seed, batch_size=16, regions=3, size=64):
    """A batch with the train pipeline's keys (image, text, boxes, box_mask, region_text, lexeme, lexeme_id)."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, size * 0.6, (batch_size, regions, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (batch_size, regions, 2))
    boxes = np.concatenate([x0, x0 + wh], -1).astype(np.float32)
    box_mask = rng.uniform(size=(batch_size, regions)) < 0.8
    box_mask[:, 0] = True
    return {
        "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "text": _tokens(rng, (batch_size,)),
        "boxes": boxes,
        "box_mask": box_mask,
        "region_text": _tokens(rng, (batch_size, regions)),
        "lexeme": _tokens(rng, (batch_size, regions), vocab=20),
        "lexeme_id": rng.integers(0, 6, size=(batch_size, regions)).astype(np.int32),
    }


def subprocess_env(devices: int | None = None) -> dict:
    """Environment for a CPU subprocess run of the package: `devices` fake devices (default one), the repo on the
    path; the rest is this process's environment (conftest.py turns most XLA optimisations off there: the tiny runs
    are compile-bound)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def main_command(workdir, *overrides, arg="smoke,noeval") -> list[str]:
    """`python -m harmoclip_jax.main` on the demo config (smoke by default), quiet, with `overrides`."""
    import sys

    return [sys.executable, "-m", "harmoclip_jax.main", f"--config=configs/demo.py:{arg}", f"--workdir={workdir}",
            "--config.progress_bar=False", "--config.plot=False", *overrides]


def run_main(workdir, *overrides, arg="smoke,noeval", check=True, timeout=240):
    """Runs `main_command` as a child of the warm server (`warm_python`: a fresh process without the imports; one
    CPU device); with `check`, a failure shows its output's tail."""
    import warm_python

    cmd = main_command(workdir, *overrides, arg=arg)
    proc = warm_python.run(cmd, cwd=ROOT, env=subprocess_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def losses_by_step(workdir) -> dict[int, float]:
    from harmoclip_jax.metrics_writer import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if "loss" in r}


def scenes_spm(path, extra_lines=(), vocab_size=90):
    """A tiny SentencePiece model (SigLIP's tokenizer kind) for the Scenes captions: their words, `extra_lines`,
    and every letter, so nothing is unknown. Returns the path of `path/spiece.model`."""
    import io
    import pathlib

    import sentencepiece as spm

    from harmoclip_jax.data import scenes

    words = [*scenes.SHAPES, *scenes.COLOURS, *scenes.SIZES, "a", "an", "the", "of", "and", "with", "on", "left",
             "right", "above", "below", "next", "to", "photo", "picture", "there", "is", "are", "two", "three"]
    corpus = [" ".join(words[i:i + 6]) for i in range(len(words))] + list(extra_lines)
    corpus += ["abcdefghijklmnopqrstuvwxyz 0123456789"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 3), model_writer=buf, vocab_size=vocab_size,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                                   character_coverage=1.0, minloglevel=2)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "spiece.model").write_bytes(buf.getvalue())
    return path / "spiece.model"
