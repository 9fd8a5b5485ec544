"""constraints-lowest.txt pins every dependency of setup.cfg's install_requires to exactly its
floor, so the lowest-versions job (`make test-lowest`) tests the floors that a user's pip may
install, and a floor raised in one file without the other fails here."""

from __future__ import annotations

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def _install_requires() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    reqs = [Requirement(line) for line in map(str.strip, lines) if line and line[0] != "#"]
    return {canonicalize_name(r.name): r for r in reqs}


def _lowest_pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints-lowest.txt: {line!r} is not an == pin"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"setup.cfg: {req} needs exactly one >= floor"
    return floors[0]


def test_every_install_requires_floor_is_pinned_in_constraints_lowest():
    reqs, pins = _install_requires(), _lowest_pins()
    assert set(pins) == set(reqs), (
        f"only in setup.cfg: {sorted(set(reqs) - set(pins))}; "
        f"only in constraints-lowest.txt: {sorted(set(pins) - set(reqs))}")
    for name, req in reqs.items():
        assert pins[name] == _floor(req), (
            f"{name}: setup.cfg's floor is {_floor(req)}, constraints-lowest.txt pins {pins[name]}:"
            " set both to the lowest version the lowest-versions job passes with")
        assert req.specifier.contains(pins[name], prereleases=True), (name, str(req.specifier))
