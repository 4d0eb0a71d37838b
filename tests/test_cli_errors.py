"""Every CLI speaks in one line: expected errors print `error: ...` to stderr and exit non-zero without a traceback;
`--verbose` (or HARMOCLIP_VERBOSE=1) adds the traceback. The shared logic is `harmoclip_jax.cli`.

The `python -m` cases of one CLI run in one subprocess: a driver imports the heavy libraries once and forks a child
per case, which runs the module as `__main__` with the case's argv (so flag parsing is the real one).
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from harmoclip_jax import cli, distributed
from trainer_helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]

_DRIVER = textwrap.dedent("""
    import json, os, runpy, sys, tempfile
    module, preload, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for name in preload.split(","):
        __import__(name)
    results = []
    for case in cases:
        err = tempfile.TemporaryFile()
        pid = os.fork()
        if pid == 0:
            os.dup2(err.fileno(), 2)
            os.environ.update(case.get("env", {}))
            sys.argv = [module, *case["argv"]]
            code = 0
            try:
                exec(case.get("setup", ""), {})
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        results.append({"code": os.waitstatus_to_exitcode(status), "stderr": err.read().decode(errors="replace")})
    print("RESULTS" + json.dumps(results))
""")


def run_cases(module: str, cases: list[dict], preload=("absl.flags", "harmoclip_jax.cli"), cwd=ROOT) -> list[dict]:
    """Runs `python -m module` once per case ({"argv": [...], "env": {...}, "setup": "python code"})."""
    proc = subprocess.run([sys.executable, "-c", _DRIVER, module, ",".join(preload), json.dumps(cases)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS", 1)[1])


def assert_one_line_error(result: dict, code: int, *fragments: str) -> str:
    stderr = result["stderr"]
    assert result["code"] == code, (result["code"], stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------------------ the helper


def test_describe_config_typo_keeps_the_suggestion():
    error = AttributeError(KeyError('\'lrr\'\nDid you mean "lr" instead of "lrr"?'))
    message = cli.describe(error, ["main", "--config=configs/demo.py", "--config.optim.lrr=1"])
    assert message.startswith("--config.optim.lrr: the config has no field 'lrr'")
    assert 'Did you mean "lr" instead of "lrr"?' in message and "\n" not in message


def test_describe_optional_loss_field_names_the_config_argument():
    # Optional loss fields are absent from default configs, so `--config.loss.<field>` cannot set them: the error
    # says which config file argument does, and that the argument really works is checked by the config tests.
    argv = ["main", "--config=configs/demo.py", "--config.loss.lrc_text=tokens"]
    message = cli.describe(AttributeError(KeyError("'lrc_text'")), argv)
    assert message.startswith("--config.loss.lrc_text: 'lrc_text' is an optional loss field"), message
    assert "--config=configs/demo.py:lrc_text=tokens" in message and "\n" not in message
    message = cli.describe(AttributeError(KeyError("'lrc_token_source'")),
                           ["main", "--config.loss.lrc_token_source=caption"])
    assert ":lrc_source=caption" in message, message
    message = cli.describe(AttributeError(KeyError("'lrc_form'")), ["main", "--config.loss.lrc_form=sigmoid"])
    assert "set config.loss.lrc_form in a config file" in message, message
    # The same key elsewhere is an ordinary typo.
    message = cli.describe(AttributeError(KeyError("'lrc_text'")), ["main", "--config.optim.lrc_text=1"])
    assert "the config has no field 'lrc_text'" in message, message


def test_describe_strips_embedded_tracebacks():
    text = ("flag --config=configs/demo.py:method=x: Error whilst parsing config file:\n\n  Traceback (most recent "
            "call last):\n    File \"configs/demo.py\", line 16\n  ValueError: method='x' is unknown\n")
    assert cli.describe(ValueError(text)) == "flag --config=configs/demo.py:method=x: method='x' is unknown"


def test_run_prints_one_line_and_exits_with_the_code(capsys, monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)

    def main(argv):
        raise cli.UsageError(f"bad {argv}")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["prog", "--x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: bad ['--x']\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda argv: open("/nonexistent/file"), ["prog"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: No such file or directory: /nonexistent/file\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run(lambda argv: 1 / 0, ["prog"])
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    with pytest.raises(SystemExit):
        cli.run(main, ["prog"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad []\n")


def test_launch_arguments_from_the_readme_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.launch_arguments(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                 "process_id": 3}
    assert distributed.launch_arguments({}) is None
    assert distributed.launch_arguments({"SLURM_JOB_ID": "7"}) == {}  # jax detects the cluster
    with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
        distributed.launch_arguments({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match=r"must be in 0\.\.1"):
        distributed.launch_arguments({**env, "JAX_NUM_PROCESSES": "2"})


# ------------------------------------------------------------------------------------------------ the CLIs


def test_main_bad_flags_and_configs(tmp_path):
    smoke = "--config=configs/demo.py:smoke,noeval"
    workdir = f"--workdir={tmp_path / 'run'}"
    bad_records = ("import harmoclip_jax.train as t\nfrom harmoclip_jax.data import pipeline\n"
                   "def fail(config, workdir):\n"
                   "    raise pipeline.BadRecordsError('12 of 40 training records were bad (30%), over "
                   "config.max_bad_fraction=0.1')\n"
                   "t.train_and_evaluate = fail\n")
    cases = [
        {"argv": [smoke, "--config.optim.lrr=1", workdir]},
        {"argv": ["--config.optim.lrr=1", workdir]},  # the default config file, parsed while the flag is defined
        {"argv": [smoke, "--config.nokey=1", workdir]},
        {"argv": ["--config=configs/nope.py", workdir]},
        {"argv": ["--config=configs/demo.py:method=harmoclipp", workdir]},
        {"argv": [smoke, "--config.batch_size=abc", workdir]},
        {"argv": [smoke, "--config.method=clip", workdir]},
        {"argv": [smoke, workdir], "env": {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}},
        {"argv": [smoke, workdir], "setup": bad_records},
        # No deprecated import machinery while the config file loads (ml_collections' own loader calls
        # load_module(), which Python 3.12 warns about and a later Python removes): as an error, nothing changes.
        {"argv": ["--config.optim.lrr=1", workdir],
         "setup": "import warnings; warnings.filterwarnings('error', 'the load_module', DeprecationWarning)"},
        {"argv": [smoke, "--config.optim.lrr=1", workdir, "--verbose"]},
        {"argv": [smoke, "--config.optim.lrr=1", workdir], "env": {"HARMOCLIP_VERBOSE": "1"}},
        {"argv": [smoke, workdir, "--nope"]},
        {"argv": [smoke, "--config.profile_steps=(3,)", workdir]},
    ]
    results = run_cases("harmoclip_jax.main", cases, preload=("absl.flags", "ml_collections.config_flags",
                                                               "harmoclip_jax.config_lib", "harmoclip_jax.cli"))
    assert_one_line_error(results[0], 2, "--config.optim.lrr", "no field 'lrr'", 'Did you mean "lr"')
    assert_one_line_error(results[1], 2, "--config.optim.lrr", 'Did you mean "lr"')
    assert_one_line_error(results[2], 2, "--config.nokey", "no field 'nokey'")
    assert_one_line_error(results[3], 2, "no config file configs/nope.py", "--config=configs/demo.py")
    assert_one_line_error(results[4], 2, "method='harmoclipp' is unknown", "fineclip")
    assert_one_line_error(results[5], 2, "--config.batch_size=abc", "invalid literal for int()")
    assert_one_line_error(results[6], 2, "--config.method", ":method=fineclip")
    assert_one_line_error(results[7], 1, "JAX_PROCESS_ID is not")
    assert_one_line_error(results[8], 1, "12 of 40 training records were bad")
    assert results[9] == results[1]
    assert_one_line_error(results[12], 2, "Unknown command line flag 'nope'", "(see --help)")
    for verbose in results[10:12]:
        assert verbose["code"] == 2 and "Traceback" in verbose["stderr"]
        assert verbose["stderr"].rstrip().splitlines()[-1].startswith("error: --config.optim.lrr")
    bad_profile = next(r for c, r in zip(cases, results) if "--config.profile_steps=(3,)" in c["argv"])
    assert_one_line_error(bad_profile, 1, "config.profile_steps=(3,) must be (start, stop) with 1 <= start < stop",
                          "--config.profile_steps='(10, 13)'")


def test_convert_unreadable_and_mismatched_weights(tmp_path):
    import torch
    from safetensors.numpy import save_file

    (tmp_path / "hf").mkdir()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    save_file({"visual.proj": np.zeros((4, 4), np.float32)}, str(tmp_path / "wrong.safetensors"))
    out = ["--out", str(tmp_path / "out")]
    cases = [
        {"argv": ["--hf", str(tmp_path / "hf"), *out]},
        {"argv": ["--open_clip", str(tmp_path / "text.pt"), "--variant", "test-tiny", *out]},
        {"argv": ["--open_clip", str(tmp_path / "list.pt"), "--variant", "test-tiny", *out]},
        {"argv": ["--open_clip", str(tmp_path / "text.safetensors"), "--variant", "test-tiny", *out]},
        {"argv": ["--open_clip", str(tmp_path / "wrong.safetensors"), "--variant", "test-tiny", *out]},
        {"argv": ["--open_clip", str(tmp_path / "wrong.safetensors"), "--variant", "ViT-X", *out]},
        {"argv": ["--params", str(tmp_path / "nowhere"), "--to_hf", str(tmp_path / "hf2")]},
        {"argv": ["--out", str(tmp_path / "x")]},
        {"argv": ["--hf", str(tmp_path / "hf"), "--bogus_flag=1"]},
    ]
    results = run_cases("harmoclip_jax.convert", cases, preload=("absl.flags", "harmoclip_jax.cli",
                                                                  "harmoclip_jax.models.convert", "harmoclip_jax.checkpoint",
                                                                  "torch"))
    assert_one_line_error(results[0], 1, "is not a Hugging Face model directory: it has no config.json")
    assert_one_line_error(results[1], 1, "text.pt is not a torch state dict that torch.load can read")
    assert_one_line_error(results[2], 1, "list.pt holds a list, not a state dict")
    assert_one_line_error(results[3], 1, "text.safetensors is not a readable .safetensors state dict")
    # A mismatch report is a compact block: the one error line, then the missing/unexpected keys and the hint.
    line = assert_one_line_error(results[4], 1, "wrong.safetensors does not fit a open_clip CLIP")
    assert "missing keys (" in results[4]["stderr"] and "Check the variant" in results[4]["stderr"]
    assert len(results[4]["stderr"].splitlines()) <= 5 and line
    assert_one_line_error(results[5], 1, "unknown CLIP variant 'ViT-X'", "ViT-B/16")
    assert_one_line_error(results[6], 1, "is not a harmoclip_jax params checkpoint")
    assert_one_line_error(results[7], 2, "exactly one of --hf, --open_clip, --params", "--help")
    assert_one_line_error(results[8], 2, "Unknown command line flag 'bogus_flag'", "(see --help)")


def test_predict_bad_inputs(tmp_path):
    cases = [
        {"argv": ["--checkpoint", str(tmp_path / "nowhere"), "--scene", "val:0"]},
        {"argv": ["--scene", "foo"]},
        {"argv": ["--scene", "val:0", "extra"]},
        {"argv": []},
        {"argv": ["--checkpoint", str(tmp_path), "--scene", "val:0", "--labels", "a", "--labels_file", "x"]},
        {"argv": ["--scen=val:0"]},
    ]
    results = run_cases("harmoclip_jax.predict", cases, preload=("absl.flags", "harmoclip_jax.cli",
                                                                  "harmoclip_jax.inference"))
    assert_one_line_error(results[0], 1, "nowhere", "does not exist")
    assert_one_line_error(results[1], 2, "--scene 'foo': expected SPLIT:INDEX", "--help")
    assert_one_line_error(results[2], 2, "unexpected arguments ['extra']")
    assert_one_line_error(results[3], 2, "give --image and --boxes (or --scene SPLIT:INDEX)")
    assert_one_line_error(results[4], 2, "--labels or --labels_file, not both")
    assert_one_line_error(results[5], 2, "Unknown command line flag 'scen'", "Did you mean: scene", "(see --help)")


def test_argument_parser_errors_are_one_line(capsys, monkeypatch):
    """cli.ArgumentParser (every argparse program's): argparse's errors without its usage block; --verbose adds it."""
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    parser = cli.ArgumentParser(prog="prog")
    parser.add_argument("--n", type=int, required=True)
    for argv, message in [(["--n", "1", "--nope"], "unrecognized arguments: --nope"),
                          ([], "the following arguments are required: --n"),
                          (["--n", "x"], "argument --n: invalid int value: 'x'")]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {message} (see --help)\n"
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    with pytest.raises(SystemExit):
        parser.parse_args([])
    err = capsys.readouterr().err
    assert err.startswith("usage: prog") and err.endswith("error: the following arguments are required: --n "
                                                          "(see --help)\n")


# The argparse programs of the package, and aot (absl, its flags parsed by config_lib's parser): each case's
# (argv, exit code, fragments of the one error line). Their heavy imports are preloaded once by the driver.
BAD_FLAGS = {
    "harmoclip_jax.data.prepare": (("tensorflow_datasets", "harmoclip_jax.data.registry"), [
        (["--dataset", "scenes", "--data_dir", "x", "--nope"], 2, "unrecognized arguments: --nope (see --help)"),
        ([], 2, "the following arguments are required: --dataset, --data_dir (see --help)"),
        (["--dataset", "nope", "--data_dir", "x"], 2, "argument --dataset: invalid choice: 'nope'"),
        (["--dataset", "scenes", "--data_dir", "x", "--option", "k"], 2, "--option expects KEY=VALUE, got 'k'"),
    ]),
    "harmoclip_jax.data.scenes": (("tensorflow_datasets", "harmoclip_jax.data.lexemes"), [
        (["--nope"], 2, "unrecognized arguments: --nope (see --help)"),
        (["--split", "nope"], 2, "argument --split: invalid choice: 'nope'"),
    ]),
    "harmoclip_jax.aot": (("absl.flags", "ml_collections.config_flags", "harmoclip_jax.config_lib"), [
        (["--nope"], 2, "Unknown command line flag 'nope' (see --help)"),
    ]),
}


@pytest.mark.parametrize("module", sorted(BAD_FLAGS))
def test_bad_flags_are_one_line(module):
    preload, cases = BAD_FLAGS[module]
    results = run_cases(module, [{"argv": argv} for argv, _, _ in cases], preload=("harmoclip_jax.cli", *preload))
    for (argv, code, *fragments), result in zip(cases, results):
        assert_one_line_error(result, code, *fragments)
        assert "usage:" not in result["stderr"], (argv, result["stderr"][-2000:])


def test_prepare_missing_dataset_files(tmp_path, capsys, monkeypatch):
    """In process: cli.run(prepare.main) with an empty --manual_dir names the files to download."""
    from harmoclip_jax.data import prepare

    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    (tmp_path / "manual").mkdir()
    argv = ["prepare", "--dataset", "coco_retrieval", "--manual_dir", str(tmp_path / "manual"), "--data_dir",
            str(tmp_path / "tfds")]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(prepare.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "missing manually downloaded files" in err and "val2017" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.run(prepare.main, argv[:3] + argv[5:])  # no --manual_dir
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: coco_retrieval is built from manually downloaded files: pass "
                                       "--manual_dir (docs/datasets.md)\n")


def test_tradeoff_bad_arguments(tmp_path):
    def study(*args):
        return subprocess.run([sys.executable, "benchmarks/tradeoff.py", "--workdir", str(tmp_path / "w"),
                               "--report_dir", str(tmp_path / "r"), *args], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)

    assert_one_line_error({"code": (p := study("--scale", "-1")).returncode, "stderr": p.stderr}, 2,
                          "--scale=-1.0 must be positive")
    assert_one_line_error({"code": (p := study("--report_only")).returncode, "stderr": p.stderr}, 1,
                          "no finished runs in", "run without --report_only first")
    assert os.path.exists(tmp_path / "w" / "study.json")
    result = {"code": (p := study("--nope")).returncode, "stderr": p.stderr}
    assert_one_line_error(result, 2, "unrecognized arguments: --nope (see --help)")
    assert "usage:" not in p.stderr
