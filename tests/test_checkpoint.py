"""Orbax params checkpoints and the conversion CLI."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from harmoclip_jax import checkpoint
from harmoclip_jax.models.clip import CLIP
import warm_python
from trainer_helpers import ROOT, subprocess_env


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_save_load_params_round_trip(tmp_path, rng):
    model = CLIP("test-tiny", rngs=nnx.Rngs(3))
    checkpoint.save_params(model, tmp_path / "ckpt")
    loaded = checkpoint.load_params(tmp_path / "ckpt")
    assert loaded.config == model.config
    for a, b in zip(_params(model), _params(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    images = jnp.asarray(rng.standard_normal((1, 64, 64, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(model.encode_image(images)), np.asarray(loaded.encode_image(images)))


def test_load_params_onto_a_mesh_and_with_overrides(tmp_path):
    model = CLIP("test-tiny", rngs=nnx.Rngs(4))
    checkpoint.save_params(model, tmp_path / "ckpt")
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def fsdp(path, x):  # shard the first dim divisible by 4, else replicate
        spec = [None] * len(x.shape)
        for i, d in enumerate(x.shape):
            if d % 4 == 0:
                spec[i] = "fsdp"
                break
        return NamedSharding(mesh, P(*spec))

    loaded = checkpoint.load_params(tmp_path / "ckpt", sharding=fsdp, dtype="bfloat16")
    assert loaded.config.dtype == "bfloat16"
    emb = loaded.text.token_embedding[...]
    assert emb.sharding == NamedSharding(mesh, P("fsdp", None))
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(model.text.token_embedding[...]))


def test_save_refuses_to_overwrite_and_load_explains_missing(tmp_path):
    model = CLIP("test-tiny")
    checkpoint.save_params(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="force=True"):
        checkpoint.save_params(model, tmp_path / "ckpt")
    checkpoint.save_params(model, tmp_path / "ckpt", force=True)
    with pytest.raises(FileNotFoundError, match="not a harmoclip_jax params checkpoint"):
        checkpoint.load_params(tmp_path)


def _cli(*args):
    return warm_python.run([sys.executable, "-m", "harmoclip_jax.convert", *args], cwd=ROOT, env=subprocess_env(),
                           timeout=300)


def test_convert_cli_hf_to_orbax_and_back(tmp_path):
    import torch  # noqa: F401 - dev requirement: fails, never skips, without it
    from harmoclip_jax.testing import reference

    hf = reference.hf_clip_model("test-tiny", seed=7)
    hf.save_pretrained(tmp_path / "hf")
    run = _cli("--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--image_size", "96")
    assert run.returncode == 0, run.stderr
    assert "3,423,041 parameters" in run.stdout  # 3,421,761 + 20 new position rows x 64
    assert "position embedding resized" in run.stdout and "wrote params checkpoint" in run.stdout
    model = checkpoint.load_params(tmp_path / "ckpt")
    assert model.config.vision.image_size == 96
    run = _cli("--params", str(tmp_path / "ckpt"), "--to_hf", str(tmp_path / "hf2"))
    assert run.returncode == 0, run.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        assert (tmp_path / "hf2" / name).exists(), name  # the complete CLIPModel + CLIPProcessor directory


def test_convert_cli_usage_errors(tmp_path):
    run = _cli("--out", str(tmp_path / "x"))
    assert run.returncode == 2 and "exactly one of --hf, --open_clip, --params" in run.stderr
    run = _cli("--open_clip", str(tmp_path / "x.pt"), "--out", str(tmp_path / "y"))
    assert run.returncode == 2 and "--variant" in run.stderr


def test_saving_replicated_arrays_on_cpu_devices_compiles_nothing(tmp_path, caplog):
    """Orbax's replica-parallel save (its default off GPUs) cuts each replica's share of a replicated array with a
    compiled slice per replica and shape; on CPU devices, which share one memory, the checkpointer turns it off.
    The state restores onto the mesh unchanged."""
    import logging

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    replicated = NamedSharding(mesh, P())
    state = {"w": jax.device_put(np.arange(24.0, dtype=np.float32).reshape(8, 3), replicated),
             "b": jax.device_put(np.ones(16, np.int32), replicated)}
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        ckpt.save(1, state)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == []
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    restored = ckpt.restore(1, abstract)
    ckpt.close()
    for key in state:
        assert restored[key].sharding == replicated
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
