"""The simulated TPU image's interpreters, made on this machine when a rehearsal starts.

`python3` is a Python 3.10 (pyenv's, or SIM_PYTHON310) behind a wrapper that refuses
`-m venv` and `-m ensurepip` with Ubuntu's message, as on Google's TPU images, where
python3-venv is not installed; the Python that uv would download (interpreter downloads are
off here) is the one the tests ran with, in a folder of its own at the end of PATH.
"""

import glob
import os
import shlex
import sys

VENV_REFUSAL = """The virtual environment was not created successfully because ensurepip is not
available.  On Debian/Ubuntu systems, you need to install the python3-venv
package using the following command.

    apt install python3.10-venv

You may need to use sudo with that command.  After installing the python3-venv
package, recreate your virtual environment."""


def python310() -> str:
    if os.environ.get("SIM_PYTHON310"):
        return os.environ["SIM_PYTHON310"]
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    found = sorted(p for r in roots if r for p in glob.glob(f"{r}/versions/3.10.*/bin/python3.10"))
    if not found:
        sys.exit("error: pod-sim needs a Python 3.10 to stand in for the TPU images' python3 "
                 "(pyenv install 3.10, or set SIM_PYTHON310=/path/to/python3.10)")
    return found[-1]


def make(sim_dir: str, python_version: str) -> tuple[str, str]:
    """(image bin folder, downloads bin folder) under sim_dir."""
    image, downloads = os.path.join(sim_dir, "image", "bin"), os.path.join(sim_dir, "downloads")
    os.makedirs(image, exist_ok=True)
    os.makedirs(downloads, exist_ok=True)
    refusal = VENV_REFUSAL.replace("\n", "\\n")
    wrapper = f"""#!/bin/bash
# python3 of a TPU VM image (Ubuntu 22.04): Python 3.10 without the python3-venv package.
args=("$@")
for ((i = 0; i < ${{#args[@]}}; i++)); do
  case "${{args[i]}}" in
    -m) case "${{args[i+1]:-}}" in venv|ensurepip) printf '{refusal}\\n' >&2; exit 1;; esac; break;;
    -c|-*c) break;;
  esac
done
exec {shlex.quote(python310())} "$@"
"""
    for name in ("python3", "python3.10"):
        with open(os.path.join(image, name), "w") as f:
            f.write(wrapper)
        os.chmod(os.path.join(image, name), 0o755)
    tested = os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))
    link = os.path.join(downloads, f"python{python_version.rsplit('.', 1)[0]}")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(tested, link)
    return image, downloads
