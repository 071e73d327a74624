"""Shared helpers for the data tests: the project's own fixture files (made-up facts, real schemas)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from sadr.conf.schema import DatasetConfig
from sadr.data.load import LoadedDataset, load_cases

FIXTURES = Path(__file__).parent / "fixtures" / "data"
# Read-only real records beside the repository (never copied into it); tests using them skip when absent.
REAL_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"


def fixture_records(name: str) -> list:
    """A fresh, mutable copy of fixtures/data/<name>.json."""
    return copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8")))


def write_records(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def config(name: str, path: Path | str | None = None, **overrides) -> DatasetConfig:
    """A dataset config for `name` reading `path` (by default the format's fixture)."""
    return DatasetConfig(name=name, path=str(path if path is not None else FIXTURES / f"{name}.json"), **overrides)


def load_edited(tmp_path: Path, name: str, edit, **overrides) -> LoadedDataset:
    """Load the `name` fixture after `edit(records)` has changed (or broken) it."""
    records = fixture_records(name)
    edit(records)
    return load_cases(config(name, write_records(tmp_path / f"{name}.json", records), **overrides), tmp_path)
