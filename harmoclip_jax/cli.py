"""Run a command line's main with one-line errors: the one place every CLI of the package goes through.

    if __name__ == "__main__":
        cli.run_absl(main, define_flags=_define_flags)     # absl programs (main, predict, convert)
        sys.exit(cli.run(main))                             # argparse programs (data.prepare, benchmarks/tradeoff.py)

argparse programs build their parser with `cli.ArgumentParser` (argparse's, whose errors are one line too).

An expected failure prints `error: WHAT` (one line, or a compact block for messages that are tables, such as a
checkpoint mismatch report) to stderr and exits non-zero without a traceback:

* errors in the arguments, raised while flags are defined or parsed (absl flags, ml_collections config files and
  `--config.a.b=` overrides: typos keep ml_collections' "Did you mean" suggestion; argparse's errors through
  `cli.ArgumentParser`, without its usage block): exit code 2;
* `cli.Error` (`cli.UsageError`: exit code 2) raised by a main, and the failures a user can fix: `OSError` (missing
  or unreadable files), `ValueError` (bad values, mismatched checkpoints, bad inputs): exit code 1.

Anything else is a bug and keeps its traceback. `--verbose` on the command line (or HARMOCLIP_VERBOSE=1) prints the
traceback of expected failures too. `run`/`run_absl` also quiet the start-up noise (JAX's TPU probe, Orbax's INFO
lines on every save/restore).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from typing import Callable, Sequence

VERBOSE_ENV = "HARMOCLIP_VERBOSE"
VERBOSE_HELP = f"Print the traceback of expected errors too (or set {VERBOSE_ENV}=1)."


class Error(Exception):
    """An expected failure with a message for the user: printed as `error: MESSAGE`, exit code `code`."""

    code = 1


class UsageError(Error):
    """Wrong or inconsistent command-line arguments (exit code 2)."""

    code = 2


EXPECTED = (Error, OSError, ValueError)
USAGE_CODE = 2  # argparse's and absl's exit code for bad arguments


def verbose(argv: Sequence[str] | None = None) -> bool:
    """Whether tracebacks are wanted: `--verbose` in argv (default sys.argv) or HARMOCLIP_VERBOSE=1."""
    argv = sys.argv if argv is None else argv
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    return env not in ("", "0", "false", "no") or "--verbose" in argv[1:]


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors (unknown or missing arguments, bad values, `parser.error(...)`) are one
    line, `error: MESSAGE (see --help)`, exit code 2, instead of argparse's usage block followed by
    `PROG: error: MESSAGE`. `--verbose` on the command line (or HARMOCLIP_VERBOSE=1) prints the usage first."""

    def error(self, message: str):
        if verbose():
            self.print_usage(sys.stderr)
        print(f"error: {' '.join(message.split())} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_CODE)


def quiet_startup() -> None:
    """Silence start-up and checkpoint chatter that says nothing actionable (warnings and errors still show)."""
    # "Unable to initialize backend 'tpu'": JAX probing for libtpu on every machine without one.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    # Orbax (through absl logging) reports every save and restore at INFO.
    logging.getLogger("absl").setLevel(logging.WARNING)
    for name in ("orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _strip_embedded_traceback(text: str) -> str:
    """ml_collections/absl put a formatted traceback inside some messages: keep the text around it and the final
    `Type: message` line, without the type."""
    if "Traceback (most recent call last)" not in text:
        return text
    head, _, trace = text.partition("Traceback (most recent call last)")
    last = [line.strip() for line in trace.splitlines() if line.strip()][-1]
    last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", last)
    head = re.sub(r"\s*Error whilst parsing config file:\s*$", "", head.strip())
    return f"{head.rstrip(':')}: {last}" if head else last


def _config_key_message(error: BaseException, argv: Sequence[str]) -> str | None:
    """ml_collections' KeyError/AttributeError for an override naming no field -> which flag, which key, the hint."""
    text = error.args[0] if error.args else ""
    while isinstance(text, BaseException):  # ml_collections raises AttributeError(KeyError(message))
        text = text.args[0] if text.args else ""
    text = str(text)
    first, _, hint = text.partition("\n")
    key = first.strip().strip("'\"")
    if not key:
        return None
    culprits = [a.split("=", 1)[0] for a in argv[1:]
                if a.startswith(("--config.", "-config.")) and key in a.split("=", 1)[0].split(".")[1:]]
    if not culprits:  # not an override's typo (say, a bug in a config file): describe it as it is
        return None
    hint = hint.strip()
    if culprits[-1].lstrip("-") == f"config.loss.{key}":
        from harmoclip_jax import config_lib, losses

        option = losses.optional_loss_options().get(key)
        if option is not None:  # left out of default configs so that older workdirs keep their identity
            arg, files = config_lib.OPTIONAL_LOSS_ARGS.get(key, (None, ()))
            if arg:
                takes = "takes" if len(files) == 1 else "take"
                how = (f"pass it as a config file argument instead, e.g. --config={files[0]}:{arg}="
                       f"{option.choices[-1]} ({' and '.join(files)} {takes} {arg}=)")
            else:
                how = f"set config.loss.{key} in a config file"
            choices = f", choices {list(option.choices)}" if option.choices else ""
            return (f"{culprits[-1]}: {key!r} is an optional loss field, absent from this config (default "
                    f"{option.default!r}{choices}); {how}")
    return f"{culprits[-1]}: the config has no field {key!r}" + (f" ({hint})" if hint else "") + \
        "; the fields are listed in the config file and harmoclip_jax/config_lib.py"


def describe(error: BaseException, argv: Sequence[str] = ()) -> str:
    """The message printed for `error` (without the `error: ` prefix)."""
    if isinstance(error, (KeyError, AttributeError)):
        message = _config_key_message(error, argv)
        if message:
            return message
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])  # str(KeyError) is the repr of its argument
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and error.strerror:  # not "[Errno 2] ... 'x'"
        text = f"{error.strerror}: {error.filename}"
    return _strip_embedded_traceback(text).strip()


def fail(error: BaseException, code: int, argv: Sequence[str] = ()) -> None:
    """Print `error` as `error: ...` (after its traceback when verbose) and exit with `code`."""
    if verbose(argv):
        traceback.print_exception(error)
    print(f"error: {describe(error, argv)}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None


def _code(error: BaseException) -> int:
    return error.code if isinstance(error, Error) else 1


def run(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """Runs an argparse-style `main(argv_without_program) -> exit code`; expected errors become one line."""
    argv = list(sys.argv if argv is None else argv)
    quiet_startup()
    try:
        return main(argv[1:]) or 0
    except EXPECTED as error:
        fail(error, _code(error), argv)
    return 1  # not reached


def run_absl(main: Callable[[list[str]], int | None], define_flags: Callable[[], None] | None = None,
             argv: Sequence[str] | None = None) -> None:
    """`absl.app.run(main)` with one-line errors, including those raised while flags are defined and parsed.

    `define_flags` defines the flags that parse (part of) the command line when they are defined, such as
    ml_collections' DEFINE_config_file: call it here, not at import, so its errors are reported like the others.
    """
    from absl import app, flags
    from absl import logging as absl_logging

    argv = list(sys.argv if argv is None else argv)
    quiet_startup()
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)

    def parse(args: list[str]) -> list[str]:
        try:
            if define_flags is not None:
                define_flags()
            rest = flags.FLAGS(args)
        except SystemExit:
            raise
        except flags.UnrecognizedFlagError as error:  # keeps absl's "Did you mean"; argparse's programs say the same
            unknown = flags.Error(f"{describe(error, args)} (see --help)")
            unknown.__cause__ = error
            fail(unknown, USAGE_CODE, args)
        except Exception as error:  # noqa: BLE001 - anything raised while reading the arguments is the user's input
            fail(error, USAGE_CODE, args)
        if not flags.FLAGS["verbosity"].present:  # parsing --verbosity resets absl's level to INFO: quiet again
            absl_logging.set_verbosity(absl_logging.WARNING)
        return rest

    try:
        app.run(main, argv=argv, flags_parser=parse)
    except EXPECTED as error:
        fail(error, _code(error), argv)
