"""What every absl entrypoint shares: one-line errors for bad flags and bad input, quiet logs.

    cli.run(main)   # instead of app.run(main)
"""

import logging as std_logging
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from vitpod.errors import UserError, one_line


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        # Every process fails alike (primary_first): leave without JAX's shutdown barrier,
        # which can wait minutes for a process 0 that already left (seen under load).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{one_line(e)} (see --helpfull)")
    except (KeyError, AttributeError) as e:  # ml_collections: an override of an unknown key
        # e.args[0] reads "'batch_sise'\nDid you mean "batch_size" instead of "batch_sise"?"
        text = str(e.args[0]) if e.args else str(e)
        found = re.search(r"'([\w.]+)'", text) or re.search(r"([\w.]+)", text)
        key = found.group(1) if found else "?"
        bad = [a.split("=")[0] for a in argv if re.match(rf"--\w+\.(\w+\.)*{key}\b", a)]
        where = bad[0] if bad else "a --config.KEY override"
        near = re.search(r'Did you mean "([\w.]+)"', text)
        hint = f"; did you mean {near.group(1)}?" if near else ""
        _fail(f"{where}: unknown config key '{key}'{hint} (every key a config can set is in "
              "vitpod/config.py)")
    except (OSError, ValueError, TypeError, SyntaxError) as e:  # unreadable or broken config
        _fail(f"cannot load the --config file: {one_line(e)}")


def config(value) -> "ml_collections.ConfigDict":  # noqa: F821
    """The value of a config_flags flag, or UserError if its file failed to load."""
    if value is None:
        raise UserError("pass --config=configs/NAME.py (see configs/)")
    try:
        value.get("seed")  # a file that failed to load raises on first use
    except OSError as e:
        raise UserError(f"cannot load the --config file: {one_line(e)}") from None
    return value


class _QuietLibraries(std_logging.Filter):
    """Drop the INFO chatter of orbax (dozens of lines per save); keep its warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def run(main: Callable[[list[str]], None]) -> None:
    """app.run with flag errors and UserError reported as one line, exit code 2."""

    def guarded(argv):
        logging.get_absl_handler().addFilter(_QuietLibraries())
        try:
            main(argv)
        except UserError as e:
            logging.flush()
            _fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)
