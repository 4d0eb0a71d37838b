"""Every command in README.md stays valid: its module exists, each flag it uses is one the module defines, and each
`--config=...` (with its `:arguments`) and `--config.a.b=` override names a real config field.

The commands' behaviour is tested elsewhere with small inputs: the demo by test_train_e2e (smoke setting), convert
by test_checkpoint, prepare by test_real_datasets/test_scenes, predict by test_inference, the tests by CI itself.
"""
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

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
    assert "pip install -r requirements-dev.txt && python -m pytest -q" in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements-dev.txt" in ci and "python -m pytest -q" in ci


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_is_valid(command):
    program, arguments = _program(command)
    module = program[-1]
    flags = [a for a in arguments if a.startswith("--")]
    plain = [f.split("=")[0] for f in flags if not f.startswith("--config.")]
    def usage(flag):  # absl modules print their flags for --helpfull (exit code 1), argparse ones for --help
        return subprocess.run([sys.executable, *program, flag], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)

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


def test_readme_tradeoff_table_is_the_generated_one():
    """The study's table in the README is exactly what `benchmarks/tradeoff.py` last wrote to docs/tradeoff.md."""
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- tradeoff table: begin -->\n", "<!-- tradeoff table: end -->"
    assert begin in readme and end in readme
    shown = readme.split(begin, 1)[1].split(end, 1)[0]
    generated = (ROOT / "docs" / "tradeoff.md").read_text().split("\n", 1)[1]  # without the regenerate comment
    assert shown.strip() == generated.strip()
    command = (ROOT / "docs" / "tradeoff.md").read_text().split("\n", 1)[0]
    assert command.removeprefix("<!-- regenerate: ").removesuffix(" -->") in readme
    assert "docs/tradeoff.png" in readme and (ROOT / "docs" / "tradeoff.png").exists()
