"""The declared ranges, the two tested sets and the run-start warning agree with each other."""
from __future__ import annotations

import logging
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from sadr import versions
from sadr.versions import LOCKED, OLDEST, pinned_versions, untested, warn_if_untested

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def declared() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = project["dependencies"] + [spec for extra in project["optional-dependencies"].values() for spec in extra]
    return [r for r in map(Requirement, specs) if r.name != project["name"]]  # "sadr[slurm,joblib]" names extras


def test_oldest_set_is_every_lower_bound_and_locked_set_is_inside_every_range():
    oldest, locked = pinned_versions(OLDEST), pinned_versions(LOCKED)
    for requirement in declared():
        name = requirement.name.lower()
        (low,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert oldest[name] == Version(low), name
        assert requirement.specifier.contains(locked[name]), (name, locked[name])
        assert locked[name] >= oldest[name], name


def test_outside_the_tested_range_warns_once_per_package(caplog):
    oldest, locked = pinned_versions(OLDEST)["transformers"], pinned_versions(LOCKED)["transformers"]
    newer = f"{locked.major}.{locked.minor + 1}.0"  # a release after the lock was made
    inside = {"torch": "2.13.0+cpu", "transformers": str(locked)}
    assert untested(inside) == []
    assert untested({**inside, "transformers": str(oldest)}) == []
    (message,) = untested({**inside, "transformers": newer})
    assert message.startswith(f"transformers {newer} is outside the tested range {oldest}–{locked}")
    assert "sadr/constraints/locked.txt" in message
    (message,) = untested({"torch": "2.11.0+cu130", "transformers": "5.17.0"})  # the GPU machine of docs/gpu.md
    assert message.startswith("torch 2.11.0+cu130 is outside the tested range 2.13.0–2.13.0")
    with caplog.at_level(logging.WARNING, logger="sadr.versions"):
        assert warn_if_untested() == untested()  # the installed versions: CI runs inside the range
    assert len(caplog.records) == len(untested())


def test_an_installed_version_outside_the_range_is_a_warning_at_run_start(caplog, monkeypatch):
    """The run's log shows it at WARNING, once for each package outside its range."""
    monkeypatch.setattr(versions.metadata, "version", lambda name: "0.1")
    with caplog.at_level(logging.WARNING, logger="sadr.versions"):
        messages = warn_if_untested()
    assert len(messages) == 2 and [r.getMessage() for r in caplog.records] == messages
    assert {r.levelno for r in caplog.records} == {logging.WARNING}


def test_comments_in_a_constraints_file_are_not_read_as_pins(tmp_path, monkeypatch):
    (tmp_path / "constraints").mkdir()
    (tmp_path / "constraints" / "pins.txt").write_text(
        "# made by tools/lock.sh: old-tool==0.1\nTorch==2.13.0+cpu  # the CPU build\nsafe_tensors.x == 1.2\n")
    monkeypatch.setattr(versions.resources, "files", lambda package: tmp_path)
    assert pinned_versions("pins.txt") == {"torch": Version("2.13.0+cpu"), "safe-tensors-x": Version("1.2")}


def test_a_version_written_with_fewer_parts_is_the_same_release():
    """torch 2.13 is 2.13.0, and a local CPU build of a pinned release is that release."""
    oldest, locked = pinned_versions(OLDEST)["torch"], pinned_versions(LOCKED)["torch"]
    for low_or_high in (oldest, locked):
        short = ".".join(str(part) for part in low_or_high.release).removesuffix(".0")
        assert untested({"torch": short, "transformers": str(pinned_versions(LOCKED)["transformers"])}) == []
        assert untested({"torch": f"{low_or_high}+cpu", "transformers": str(pinned_versions(LOCKED)["transformers"])}) == []


def test_a_pre_release_of_the_oldest_pinned_release_is_inside_the_tested_range():
    """_release drops the pre-release part as well as the local build: torch <oldest>rc1+cpu is the oldest release."""
    oldest = pinned_versions(OLDEST)["torch"]
    base = ".".join(str(part) for part in oldest.release)
    assert untested({"torch": f"{base}rc1+cpu", "transformers": str(pinned_versions(LOCKED)["transformers"])}) == []
