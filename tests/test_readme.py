"""Every command in README.md stays valid: its module exists, each flag it uses is one the module defines, and each
`--config=...` (with its `:arguments`) and `--config.a.b=` override names a real config field.

`test_readme_commands_run` runs the commands themselves, as written, at the demo's smoke size: the first demo
command (with `:smoke` appended to its config argument), the predict command on its workdir, and the five convert
commands, with HOME in a temporary folder holding a tiny Hugging Face CLIPModel at ~/models/clip-vit-base-patch16, a
tiny open_clip state dict as ViT-B-16.pt (the open_clip command's `--variant ViT-B/16 --image_size 336` become
`test-tiny`/96: a real ViT-B/16 is too big for a test), a tiny EVA02-CLIP in the original EVA-CLIP layout as
EVA02_CLIP_B_psz16_s8B.pt (variant EVA02-test-tiny) and a tiny SiglipModel at ~/models/siglip-base-patch16-224. Not run, only checked for validity: the other training
commands (the baseline is the demo with another method; the COCO protocol needs COCO and converted weights), the
prepare commands (COCO/Flickr30k files: their builders run on hand-made files in test_real_datasets), the trade-off
study (test_tradeoff runs it at smoke size) and the test command (CI runs it). The multi-host launch is run by
test_multiprocess (with a resume across process counts); README command 1's runtime-only install by .ci/run.
"""
import json
import pathlib
import re
import shlex
import sys

import pytest
import warm_python
from trainer_helpers import subprocess_env

ROOT = pathlib.Path(__file__).parents[1]


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(("python -m harmoclip_jax", "python benchmarks/")):
                    commands.append(shlex.split(part))
    return commands


COMMANDS = _readme_commands()


def _program(command: list[str]) -> tuple[list[str], list[str]]:
    """(how to run it, its arguments): `python -m module ...` or `python benchmarks/script.py ...`."""
    if command[1] == "-m":
        return ["-m", command[2]], command[3:]
    return [command[1]], command[2:]


def test_readme_has_the_quick_start_commands():
    modules = [c[2] for c in COMMANDS if c[1] == "-m"]
    assert "harmoclip_jax.main" in modules and "harmoclip_jax.convert" in modules
    install = "pip install -r requirements-dev.txt -r requirements-aot.txt"
    assert f"{install} && python -m pytest -q" in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "quiet_pip -r requirements-dev.txt -r requirements-aot.txt" in ci and "python -m pytest -q" in ci and "export CI=true" in ci
    # README command 1: the runtime-only install and the demo (smoke size), then the package as `pip install .`.
    assert "quiet_pip -r requirements.txt" in ci and "python -m harmoclip_jax.main --config=configs/demo.py:smoke" in ci
    assert 'quiet_pip "$scratch/src"' in ci and "import harmoclip_jax.inference, harmoclip_jax.train" in ci
    # Both supported stacks: the whole suite on Python 3.11, the cross-stack subset README names on Python 3.12.
    readme = (ROOT / "README.md").read_text()
    assert "find_python 3.11" in ci and "find_python 3.12" in ci and "python -m pytest -q -m cross_stack" in ci
    assert "**Python 3.11**" in readme and "**Python 3.12**" in readme and "python -m pytest -q -m cross_stack" in readme


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_is_valid(command):
    program, arguments = _program(command)
    module = program[-1]
    flags = [a for a in arguments if a.startswith("--")]
    plain = [f.split("=")[0] for f in flags if not f.startswith("--config.")]
    def usage(flag):  # absl modules print their flags for --helpfull (exit code 1), argparse ones for --help
        return warm_python.run([sys.executable, *program, flag], cwd=ROOT, env=subprocess_env(), timeout=120)

    helptext = usage("--helpfull")
    if helptext.returncode == 2:  # argparse: no such flag
        helptext = usage("--help")
    assert helptext.returncode in (0, 1) and "Traceback" not in helptext.stderr, helptext.stderr[-2000:]
    for flag in plain:
        assert re.search(rf"{re.escape(flag)}\b", helptext.stdout), f"{module} has no flag {flag}"
    config_arg = next((f.split("=", 1)[1] for f in flags if f.startswith("--config=")), None)
    if config_arg:
        from harmoclip_jax import config_lib

        config = config_lib.load_config(str(ROOT / config_arg))
        for override in (f for f in flags if f.startswith("--config.")):
            node = config
            for key in override.split("=")[0][len("--config."):].split("."):
                assert key in node, f"{override}: config has no field {key!r}"
                node = node[key]


def test_readme_tradeoff_table_is_the_generated_one(monkeypatch):
    """The study's table in the README is exactly what `benchmarks/tradeoff.py` last wrote to docs/tradeoff.md, and
    that is the table of the runs in docs/tradeoff.json."""
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- tradeoff table: begin -->\n", "<!-- tradeoff table: end -->"
    assert begin in readme and end in readme
    shown = readme.split(begin, 1)[1].split(end, 1)[0]
    generated = (ROOT / "docs" / "tradeoff.md").read_text().split("\n", 1)[1]  # without the regenerate comment
    assert shown.strip() == generated.strip()
    command = (ROOT / "docs" / "tradeoff.md").read_text().split("\n", 1)[0]
    assert command.removeprefix("<!-- regenerate: ").removesuffix(" -->") in readme
    assert "docs/tradeoff.png" in readme and (ROOT / "docs" / "tradeoff.png").exists()
    # ... and that file is the table of docs/tradeoff.json's runs: regenerated here with the study's own code.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import tradeoff

    data = json.loads((ROOT / "docs" / "tradeoff.json").read_text())
    study = tradeoff.Study(**{**data["study"], "seeds": tuple(data["study"]["seeds"])})
    assert tradeoff.markdown_table(data["runs"], study).strip() == generated.strip()
    for row in data["runs"].values():  # per-seed values behind every mean
        for metric, values in row["per_seed"].items():
            assert len(values) == len(row["seeds"]) and abs(sum(values) / len(values) - row["mean"][metric]) < 1e-9


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    from flax import nnx

    from harmoclip_jax.models import convert
    from harmoclip_jax.models.clip import CLIP
    from harmoclip_jax.testing import reference

    reference.hf_clip_model("test-tiny", seed=3).save_pretrained(home / "models" / "clip-vit-base-patch16")
    import torch
    from safetensors.numpy import load_file

    convert.save_open_clip(CLIP("test-tiny", rngs=nnx.Rngs(1)), tmp_path / "tiny.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(tmp_path / "tiny.safetensors")).items()},
               tmp_path / "ViT-B-16.pt")
    env = {**subprocess_env(), "HOME": str(home)}
    by_module = {}
    for command in COMMANDS:
        by_module.setdefault(command[2] if command[1] == "-m" else command[1], []).append(command)

    def run(command, cwd):  # ~ is the temporary HOME, as bash expands it for a user
        assert command[0] == "python"
        line = [str(home / a[2:]) if a.startswith("~/") else a for a in [sys.executable, *command[1:]]]
        proc = warm_python.run(line, cwd=cwd, env=env, timeout=400)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (line, proc.stdout[-2000:],
                                                                          proc.stderr[-4000:])
        return proc

    # Training: the README's first command, at smoke size, in the repository (its config path is relative).
    demo = by_module["harmoclip_jax.main"][0]
    assert demo[3:] == ["--config=configs/demo.py", "--workdir=workdirs/demo"], demo
    workdir = tmp_path / "workdirs" / "demo"
    run([*demo[:3], "--config=configs/demo.py:smoke", f"--workdir={workdir}", "--config.progress_bar=False",
         "--config.plot=False"], ROOT)
    # Inference on it, from a folder holding workdirs/demo, as written.
    predict = by_module["harmoclip_jax.predict"][0]
    assert "workdirs/demo" in predict
    run(predict, tmp_path)
    assert (tmp_path / "labelled.png").exists()
    # The dense maps of "Inference", as written: a heatmap and a label map of held-out scene test:1.
    heatmap, segment = [c for c in by_module["harmoclip_jax.predict"] if "--heatmap" in c or "--segment" in c]
    run(heatmap, tmp_path)
    run(segment, tmp_path)
    assert (tmp_path / "scene_test_1_heatmap.png").exists() and (tmp_path / "scene_test_1_segment.png").exists()
    # Conversion: HF -> ours, open_clip -> ours, ours -> HF.
    hf_in, open_clip_in, to_hf, eva02_in, siglip_in = by_module["harmoclip_jax.convert"]
    run(hf_in, tmp_path)
    small = [{"ViT-B/16": "test-tiny", "336": "96"}.get(a, a) for a in open_clip_in]
    assert small != open_clip_in
    out = run(small, tmp_path).stdout
    assert "position embedding resized" in out
    run(to_hf, tmp_path)
    assert (home / "models" / "vitb16_harmoclip" / "model.safetensors").exists()
    assert (home / "ckpt" / "vitb16" / "model.json").exists() and (home / "ckpt" / "vitb16_336").exists()
    # The other families: EVA02-CLIP from the original release's layout, SigLIP from a HF directory.
    from harmoclip_jax.models import convert_eva02, eva02, siglip
    from harmoclip_jax.models.convert_siglip import save_hf_siglip

    release = convert_eva02.params_to_state_dict(eva02.EVA02CLIP("EVA02-test-tiny", rngs=nnx.Rngs(2)), "eva_clip")
    torch.save({k: torch.from_numpy(v) for k, v in release.items()}, tmp_path / "EVA02_CLIP_B_psz16_s8B.pt")
    small = [{"EVA02-B/16": "EVA02-test-tiny"}.get(a, a) for a in eva02_in]
    assert small != eva02_in and "eva02_clip family" in run(small, tmp_path).stdout
    save_hf_siglip(siglip.SigLIP("SigLIP-test-tiny", rngs=nnx.Rngs(3)), home / "models" / "siglip-base-patch16-224")
    assert "siglip family" in run(siglip_in, tmp_path).stdout
    assert (home / "ckpt" / "eva02_b16" / "model.json").exists() and (home / "ckpt" / "siglip_b16").exists()
