"""Model folders that `from_pretrained` (and `sadr-run model=local`) loads: an edited model, or a GGUF file unpacked.

A folder holds the weights as safetensors, the config and the tokenizer; an edited model's also holds `edits.json`,
a note of the edits applied (which records, which editor and settings, on which model). It is written under a
temporary name and renamed when complete, so an interrupted save never leaves a folder that looks whole.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from sadr.cache import new_file_mode
from sadr.data.records import EditCase

if TYPE_CHECKING:
    from sadr.models.loading import LoadedModel

EDITS_FILE = "edits.json"


def write_model_folder(model, tokenizer, folder: Path, notes: dict[str, str] | None = None) -> Path:
    """`model` and `tokenizer` saved into `folder` (replacing an older copy), with `notes` as {file name: text}. Every
    file gets the mode any new file gets under the umask: safetensors writes the weights owner-only, which would keep
    a group sharing a cache or a results folder from loading them."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    for name, text in (notes or {}).items():
        (partial / name).write_text(text, encoding="utf-8")
    for file in partial.iterdir():
        os.chmod(file, new_file_mode())
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def save_edited_model(loaded: LoadedModel, folder: Path, cases: list[EditCase], note: dict) -> Path:
    """Save `loaded` (already edited with `cases`) to `folder`, replacing an older copy there."""
    edits = [{"case_id": case.case_id, **asdict(case.request)} for case in cases]
    record = {"base_model": loaded.resolved_source, **note, "n_edits": len(edits), "edits": edits}
    return write_model_folder(loaded.model, loaded.tokenizer, folder,
                              {EDITS_FILE: json.dumps(record, indent=2, default=str)})
