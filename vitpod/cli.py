"""What every absl entrypoint shares: one-line errors for bad flags and bad input, quiet logs.

    cli.run(main)   # instead of app.run(main)
"""

import errno
import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

from vitpod import localfs
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
        _fail(_given_no_config(argv) or f"{one_line(e)} (see --helpfull)")
    except (KeyError, AttributeError) as e:  # ml_collections: an override of an unknown key
        if _in_config_file(e, argv):  # or the config file's own code
            _fail(_in_config_file(e, argv))
        if "has no attribute 'get_config'" in str(e):
            _fail(f"the --config file {_config_file(argv)} defines no get_config(); write "
                  "`def get_config(arg=None):` returning vitpod.config.defaults() with your "
                  "values set (see configs/)")
        if _given_no_config(argv):
            _fail(_given_no_config(argv))
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
        _fail(_in_config_file(e, argv) or f"cannot load the --config file: {one_line(e)}")
    except Exception as e:  # noqa: BLE001  raised by the config file's own code, or a bug
        line = _in_config_file(e, argv)
        if line is None:
            raise
        _fail(line)


def _config_file(argv: list[str]) -> str | None:
    """The --config file named in argv, without its ':ARG'."""
    found = [re.sub(r":[^/]*$", "", a.split("=", 1)[1]) for a in argv
             if a.startswith("--config=")]
    return found[-1] if found else None


def _in_config_file(e: BaseException, argv: list[str]) -> str | None:
    """The one line for an error raised by the code of the --config file (NameError,
    ImportError, ... at load), naming the file and line; None if it came from elsewhere."""
    path = os.path.abspath(_config_file(argv)) if _config_file(argv) else None
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if path and os.path.abspath(f.filename) == path]
    if not lines:
        return None
    return (f"cannot load the --config file {_config_file(argv)}: line {lines[-1]}: "
            f"{type(e).__name__}: {one_line(e)}")


def _given_no_config(argv: list[str]) -> str | None:
    """Why the --config file gave no vitpod config, or None: its --config.KEY overrides then
    fail as unknown flags or keys, which would hide the cause."""
    given = flags.FLAGS["config"] if "config" in flags.FLAGS else None
    if given is not None and given.present:
        return _not_a_config(given.value)
    if not _config_file(argv):
        return None
    # the overrides failed while the flag was parsed, so it holds nothing: load the file again
    found = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")][-1]
    arg = found[len(_config_file(argv)) + 1:]
    try:
        spec = importlib.util.spec_from_file_location("vitpod_config_check", _config_file(argv))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return _not_a_config(module.get_config(*([arg] if arg else [])))
    except Exception:  # noqa: BLE001  said by the error being reported
        return None


def _not_a_config(value) -> str | None:
    """Why the value a --config file's get_config() returned is not a vitpod config, or None."""
    import ml_collections

    from vitpod import config_record

    if isinstance(value, ml_collections.ConfigDict):
        missing = config_record.missing_keys(value)
        if not missing:
            return None
        what = (f"a config without {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more key(s)" if len(missing) > 5 else ""))
    else:
        what = ("None (no return statement?)" if value is None else
                f"a {type(value).__name__}, not an ml_collections ConfigDict")
    return (f"get_config() of the --config file {_config_file(sys.argv)} returns {what}; "
            "start from vitpod.config.defaults() and set your values on it (see configs/)")


def config(value) -> "ml_collections.ConfigDict":  # noqa: F821
    """The value of a config_flags flag, or UserError if its file failed to load."""
    if value is None:
        raise UserError(_not_a_config(None) if _config_file(sys.argv) else
                        "pass --config=configs/NAME.py (see configs/)")
    try:
        value.get("seed")  # a file that failed to load raises on first use
    except OSError as e:
        raise UserError(f"cannot load the --config file: {one_line(e)}") from None
    except AttributeError:  # not a ConfigDict: said below
        pass
    if _not_a_config(value):
        raise UserError(_not_a_config(value))
    return value


def check_workdir(workdir: str) -> None:
    """UserError unless a local --workdir, or the nearest part of its path that exists, is a
    folder (gs:// paths have no files in the way)."""
    path = os.path.abspath(workdir)
    while not workdir.startswith("gs://") and not os.path.lexists(path):
        path = os.path.dirname(path)
    if not workdir.startswith("gs://") and not os.path.isdir(path):
        where = "" if path == os.path.abspath(workdir) else f": {path}"
        raise UserError(f"--workdir={workdir}{where} exists and is not a folder; pass a folder "
                        "(it is made if missing)")


class _QuietLibraries(std_logging.Filter):
    """Drop the INFO chatter of orbax (dozens of lines per save); keep its warnings and errors
    as one line each (its background threads log whole tracebacks, and the error reaches
    `main` anyway); once the run failed, drop asyncio's reports of the failed writes' tasks."""

    failing = False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname or record.name == "asyncio":
            if record.levelno < std_logging.WARNING or (self.failing
                                                        and record.name == "asyncio"):
                return False
            record.exc_info, record.exc_text = None, None
        return True


def _unraisable(hook_args) -> None:
    """tensorstore reports the writes of a failed async save that finish after orbax closed
    its event loop as unraisable errors, a traceback each: the failed save is reported once,
    where orbax raises it; anything else goes to Python's default hook."""
    if not (isinstance(hook_args.exc_value, RuntimeError)
            and str(hook_args.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(hook_args)


_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}


def _disk_error(e: BaseException) -> str | None:
    """The one line for a full disk or a folder that may not be written, wherever it was
    raised (our writes, orbax's threads, tensorstore), or None."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            return str(localfs.write_error(e.filename or _somewhere(), e))
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code and int(code.group(1)) in _DISK_ERRORS:
            path = re.search(r'(?:Failed writing|Error writing [^"]*"[^"]*" in [^"]*): "([^"]+)"',
                             str(e))
            err = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
            return str(localfs.write_error(path.group(1) if path else _somewhere(), err))
        e = e.__cause__ or e.__context__
    return None


def _somewhere() -> str:
    """Where a write whose error names no file went: the entrypoint's --workdir."""
    workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
    return f"a file in {workdir}" if workdir else "a file"


def run(main: Callable[[list[str]], None]) -> None:
    """app.run with flag errors and UserError reported as one line, exit code 2."""

    def guarded(argv):
        logging.get_absl_handler().addFilter(_QuietLibraries())
        sys.unraisablehook = _unraisable
        try:
            main(argv)
        except UserError as e:
            logging.flush()
            _QuietLibraries.failing = True
            _fail(str(e))
        except Exception as e:  # noqa: BLE001  a full disk is no bug: one line, else re-raised
            line = _disk_error(e)
            if line is None:
                raise
            logging.flush()
            _QuietLibraries.failing = True
            _fail(line)

    app.run(guarded, flags_parser=_parse_flags)
