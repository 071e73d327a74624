"""The dependency versions the test suite ran on, and a warning when a run uses others.

`sadr/constraints/locked.txt` is the full set the README installs (the newest versions the declared ranges allow,
on the day the lock was made); `sadr/constraints/oldest.txt` is the set at the lower bounds of those ranges. CI runs the
suite on both (`.ci/run`), so for each package the tested range is [oldest, locked].
"""
from __future__ import annotations

import logging
from importlib import metadata, resources
from typing import Optional

from packaging.version import Version

log = logging.getLogger(__name__)

CHECKED = ("torch", "transformers")  # the packages whose changes have moved results or broken runs
LOCKED, OLDEST = "locked.txt", "oldest.txt"


def pinned_versions(lock: str) -> dict[str, Version]:
    """`name==version` lines of a constraints file in sadr/constraints, keyed by normalised name."""
    text = resources.files("sadr").joinpath("constraints", lock).read_text(encoding="utf-8")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalise(name)] = Version(version.strip())
    return pins


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def untested(installed: Optional[dict[str, str]] = None) -> list[str]:
    """One message per checked package installed outside its tested range (none when all are inside)."""
    oldest, locked = pinned_versions(OLDEST), pinned_versions(LOCKED)
    messages = []
    for name in CHECKED:
        version = (installed or {}).get(name) or metadata.version(name)
        low, high = oldest[name], locked[name]
        if not _release(low) <= _release(Version(version)) <= _release(high):
            messages.append(
                f"{name} {version} is outside the tested range {low}–{high}; results and runs are untested with it "
                "(install the locked set: pip install -e . -c sadr/constraints/locked.txt)"
            )
    return messages


def _release(version: Version) -> Version:
    """The version without its local build (+cpu, +cu130) or pre-release part, so builds of one release compare equal,
    and 2.13 equals 2.13.0 (release tuples of different lengths would not)."""
    return Version(version.base_version)


def warn_if_untested() -> list[str]:
    messages = untested()
    for message in messages:
        log.warning(message)
    return messages
