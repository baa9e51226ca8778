"""`make pod-check` on one worker (copied into its home, run by the venv's Python).

Prints one line: `ok: Python 3.11.7, vitpod 0.1.0, jax 0.10.2, 4 tpu devices`, or `FAILED: `
and every problem found (exit 1). Standard library only until it imports what it checks.
"""

import argparse
import os
import platform
import sys

try:
    from vitpod.errors import one_line
except ImportError:  # no vitpod here (what this reports): the message's last line, as one_line
    def one_line(text: object) -> str:
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        return lines[-1] if lines else "unknown error"


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"


def check(python: str, want_platform: str, local_devices: int) -> tuple[list[str], list[str]]:
    found, problems = [f"Python {platform.python_version()}"], []
    if not (platform.python_version() + ".").startswith(python + "."):
        problems.append(f"Python {platform.python_version()}, not the {python} vitpod was "
                        "tested with: make pod-setup")
    try:
        from importlib.metadata import version

        import vitpod  # noqa: F401

        found.append(f"vitpod {version('vitpod')}")
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        problems.append(f"cannot import vitpod ({_why(e)}): make pod-setup")
    try:
        import jax

        devices = jax.local_devices()
        found.append(f"jax {jax.__version__}, {len(devices)} {devices[0].platform} devices")
        if devices[0].platform != want_platform:
            problems.append(f"JAX sees {devices[0].platform}, not {want_platform}: another "
                            "process may hold the accelerator, or jax lacks the tpu extra")
        elif local_devices and len(devices) != local_devices:
            problems.append(f"JAX sees {len(devices)} local devices, the slice implies "
                            f"{local_devices} per worker")
    except Exception as e:  # noqa: BLE001
        problems.append(f"JAX could not start the {want_platform} backend ({_why(e)})")
    if not problems:  # what decoding costs on this host: plan measured it on another machine
        try:
            from vitpod import config
            from vitpod.planning import input_budget

            ms, _ = input_budget.cpu_ms_per_image(config.defaults().data)
            found.append(f"{ms:.1f} CPU ms per 224 px training image, {os.cpu_count()} CPUs")
        except Exception as e:  # noqa: BLE001
            problems.append(f"the decode measurement failed ({_why(e)})")
    return found, problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("--local_devices", type=int, default=0)
    args = parser.parse_args()
    found, problems = check(args.python, args.platform, args.local_devices)
    if problems:
        print(f"FAILED: {'; '.join(problems)} (found {', '.join(found)})")
        return 1
    print(f"ok: {', '.join(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
