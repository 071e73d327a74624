"""Editors by name, and everything they are built from (templates, statistics, regularizers)."""
from __future__ import annotations

from sadr.editors.memit import MemitEditor
from sadr.editors.pmet import PmetEditor
from sadr.editors.rome import RomeEditor

EDITORS = {"rome": RomeEditor, "memit": MemitEditor, "pmet": PmetEditor}
