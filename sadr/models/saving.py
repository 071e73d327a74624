"""Write an edited model as a folder that `from_pretrained` (and `sadr-run model=local`) loads.

The folder holds the weights as safetensors, the config, the tokenizer and `edits.json`, a note of the
edits applied (which records, which editor and settings, on which model). It is written under a
temporary name and renamed when complete, so an interrupted save never leaves a folder that looks whole.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from sadr.data.records import EditCase
from sadr.models.loading import LoadedModel

EDITS_FILE = "edits.json"


def save_edited_model(loaded: LoadedModel, folder: Path, cases: list[EditCase], note: dict) -> Path:
    """Save `loaded` (already edited with `cases`) to `folder`, replacing an older copy there."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    loaded.model.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    edits = [{"case_id": case.case_id, **asdict(case.request)} for case in cases]
    record = {"base_model": loaded.resolved_source, **note, "n_edits": len(edits), "edits": edits}
    (partial / EDITS_FILE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder
