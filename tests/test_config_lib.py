"""Config loading, the argument mini-language, and validate()'s messages."""
import pathlib

import pytest

from harmoclip_jax import config_lib, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parse_arg():
    arg = config_lib.parse_arg("method=clip,smoke,res=336", method="harmoclip", smoke=False, res=224, lr=1.0)
    assert arg.method == "clip" and arg.smoke is True and arg.res == 336 and arg.lr == 1.0
    assert config_lib.parse_arg("fineclip", method="harmoclip", res=224).method == "fineclip"  # unnamed -> first
    with pytest.raises(ValueError, match="unknown config argument 'foo'"):
        config_lib.parse_arg("foo=1", method="x")
    with pytest.raises(ValueError, match="expected a int"):
        config_lib.parse_arg("res=big", res=224)


@pytest.mark.parametrize("spec", ["configs/demo.py", "configs/demo.py:smoke", "configs/demo.py:method=clip",
                                  "configs/vitb16.py", "configs/vitb16.py:method=fineclip,res=336",
                                  "configs/vitl14.py:method=clipself", "configs/vitb16.py:method=regionclip"])
def test_configs_load_and_validate(spec):
    config = config_lib.load_config(str(ROOT / spec))
    config_lib.validate(config, num_devices=8)
    assert "method" not in config.loss  # set once: config.method


def test_vitb16_protocol_values():
    c = config_lib.load_config(str(ROOT / "configs/vitb16.py"))
    assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (1e-5, 0.9, 0.98, 1e-6, 0.1)
    assert c.optim.warmup_steps == 1000 and c.optim.schedule == "cosine"
    assert c.batch_size == 256 and c.data.max_regions == 20 and c.model.image_size == 224
    assert c.optim.freeze_text_tower and c.optim.freeze == () and c.init.mode == "params"
    assert config_lib.load_config(str(ROOT / "configs/vitb16.py:res=336")).model.image_size == 336


def test_missing_checkpoint_and_data_stop_with_instructions(tmp_path):
    c = config_lib.load_config(str(ROOT / "configs/vitb16.py"))
    c.init.params_dir = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="python -m harmoclip_jax.convert"):
        train.check_inputs(c)
    c.init.mode = "scratch"
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="python -m harmoclip_jax.data.prepare --dataset coco_train"):
        train.check_inputs(c)


def _demo():
    return config_lib.load_config(str(ROOT / "configs/demo.py"))


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(method="simclr"), "config.method='simclr' is unknown"),
    (lambda c: c.update(batch_size=60), "not divisible by the 8 devices"),
    (lambda c: c.update(mesh=[("data", 3), ("fsdp", -1)]), "not divisible by the fixed axis sizes"),
    (lambda c: c.update(mesh=[("data", 2), ("fsdp", 2)]), "needs 4 devices, but 8 are available"),
    (lambda c: c.update(mesh=[("data", -1), ("model", 1)]), "exactly the axes 'data' and 'fsdp'"),
    (lambda c: c.optim.update(grad_accum_steps=3), "grad_accum_steps=3"),
    (lambda c: c.optim.update(freeze=["text/("]), "bad regex"),
    (lambda c: c.evals.update(x={"type": "zero_shot", "dataset": "a", "split": "b"}), "known evaluators"),
    (lambda c: c.data.update(image_size=96), "config.model.image_size decides it; remove config.data.image_size"),
    (lambda c: c.data.update(batch_size=8), "config.batch_size .global. decides it"),
    (lambda c: c.model.update(family="vgg"), "unknown backbone family 'vgg'.*registered: clip"),
    (lambda c: c.model.update(variant="ViT-Q/3"), "unknown CLIP variant 'ViT-Q/3'"),
    (lambda c: c.model.update(dtype="float64"), "dtype='float64'"),
    (lambda c: c.init.update(params_dir="/ckpt"), "add --config.init.mode=params"),
])
def test_validate_rejects_bad_configs(change, message):
    c = _demo()
    change(c)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c, num_devices=8)


def test_sequence_fields_can_be_overridden_from_the_command_line():
    """ml_collections overrides tuple fields (not list ones): every sequence in the base config is a tuple."""
    from absl import flags

    argv = ["main", f"--config={ROOT / 'configs' / 'vitb16.py'}", "--config.optim.freeze=('text/.*', 'visual/conv1.*')",
            "--config.optim.no_decay=('logit_scale',)", "--config.mesh=(('data', 2), ('fsdp', 4))",
            "--config.sharding.rules=(('visual/.*', 'fsdp'), ('.*', 'replicate'))",
            "--config.region.concepts=('red circle', 'blue star')"]
    flag_values = flags.FlagValues()
    config_lib.define_config_flag("config", None, "", flag_values=flag_values, sys_argv=argv)  # as main.py does
    flag_values(argv)
    c = flag_values.config
    assert c.optim.freeze == ("text/.*", "visual/conv1.*") and c.optim.no_decay == ("logit_scale",)
    assert config_lib.mesh_shape(c.mesh, 8) == (("data", "fsdp"), (2, 4))
    assert c.sharding.rules == (("visual/.*", "fsdp"), (".*", "replicate"))
    assert c.region.concepts == ("red circle", "blue star")
    def sequences(node, path=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from sequences(value, f"{path}{key}.")
            elif isinstance(value, list):
                yield f"{path}{key}"
    assert not list(sequences(config_lib.base_config())), "list fields cannot be overridden with --config.x=..."
