"""Editors by name, and everything they are built from (templates, statistics, regularizers)."""
from __future__ import annotations

from sadr.editors.rome import RomeEditor

EDITORS = {"rome": RomeEditor}
