"""deploy/settings.py: what a TPU type implies; deploy/constraints.txt, what every worker
installs, is what this venv runs."""

from deploy.settings import slice_devices
from tests.conftest import ROOT


def test_slice_types_imply_their_device_counts():
    assert [slice_devices(t) for t in ("v4-8", "v4-32", "v5p-8", "v5litepod-16", "v6e-8",
                                       "v3-8", "v9-8")] == [4, 16, 4, 16, 8, 8, None]


def test_constraints_are_the_tested_versions():
    """deploy/constraints.txt is what `make install` installs and what every worker gets."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = [line.split("==") for line in (ROOT / "deploy" / "constraints.txt").read_text()
              .splitlines() if line and not line.startswith("#")]
    assert len(pinned) > 50
    wrong = []
    for name, want in pinned:
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have != want:
            wrong.append((name, want, have))
    assert wrong == []
    for name in ("jax", "libtpu", "orbax-checkpoint", "google-cloud-storage"):
        assert name in {n for n, _ in pinned}
