"""The test environment is the lock, and the lock is the floors that pyproject.toml promises users."""

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _locked() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "requirements" / "test.txt").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            out[name.strip().lower()] = Version(version.split()[0].split("+")[0])
    return out


def test_every_floor_in_pyproject_is_the_version_the_tests_run():
    """CI tests exactly the lower bounds users are promised (a floor that drifted from the lock, or a yanked
    release the resolver skipped, fails here)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = _locked()
    direct = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    assert len(direct) >= 15
    for req in direct:
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
        assert floors, f"{req} has no floor"
        assert locked[req.name.lower()] == floors[0], f"{req}: the lock has {locked[req.name.lower()]}"
