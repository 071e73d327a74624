"""Every editor, from the editors' own declarations (sadr/editors/plugin.py).

Modules of this package that define `EDITOR`, then installed distributions' `sadr.editors` entry points
(each naming an `EditorPlugin`), in that order; a name declared twice is an error.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

import sadr.editors
from sadr.editors.plugin import EditorPlugin

ENTRY_POINT_GROUP = "sadr.editors"


def _declared() -> list[EditorPlugin]:
    plugins = []
    for module in sorted(pkgutil.iter_modules(sadr.editors.__path__), key=lambda m: m.name):
        declared = getattr(importlib.import_module(f"sadr.editors.{module.name}"), "EDITOR", None)
        if isinstance(declared, EditorPlugin):
            plugins.append(declared)
    plugins += [point.load() for point in entry_points(group=ENTRY_POINT_GROUP)]
    return plugins


def discover() -> dict[str, EditorPlugin]:
    editors: dict[str, EditorPlugin] = {}
    for plugin in _declared():
        if not isinstance(plugin, EditorPlugin):
            raise TypeError(f"the {ENTRY_POINT_GROUP} entry point {plugin!r} is not an EditorPlugin")
        if plugin.name in editors:
            raise ValueError(f"two editors are named {plugin.name!r}: {editors[plugin.name].editor} and {plugin.editor}")
        editors[plugin.name] = plugin
    return editors


EDITORS: dict[str, EditorPlugin] = discover()
