"""Every editor, from the editors' own declarations (sadr/editors/plugin.py).

Modules of this package that define `EDITOR`, then installed distributions' `sadr.editors` entry points
(each naming an `EditorPlugin`), in that order. A declaration that cannot work (a name declared twice, a config that
is not an `EditorConfig` of that name) stops every command that reads the registry, with its origin and the fix:
the `editor` config group is built from all of them at once.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from importlib.metadata import entry_points

import sadr.editors
from sadr.conf.schema import EditorConfig
from sadr.editors.plugin import EditorPlugin
from sadr.errors import UsageError

ENTRY_POINT_GROUP = "sadr.editors"


class EditorDeclarationError(UsageError, ValueError):
    """An editor's declaration (`EDITOR = EditorPlugin(...)`) that sadr cannot register."""


def _declared() -> list[tuple[str, EditorPlugin]]:
    """(where it is declared, the declaration) of every editor."""
    plugins = []
    for module in sorted(pkgutil.iter_modules(sadr.editors.__path__), key=lambda m: m.name):
        declared = getattr(importlib.import_module(f"sadr.editors.{module.name}"), "EDITOR", None)
        if isinstance(declared, EditorPlugin):
            plugins.append((f"sadr.editors.{module.name}", declared))
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(point, "dist", None)
        origin = f"the {ENTRY_POINT_GROUP} entry point {point.name} = {point.value}"
        origin += f" of the distribution {dist.name}" if dist else ""
        try:
            plugins.append((origin, point.load()))
        except ImportError as err:  # it stops every command, whichever editor it asks for
            raise EditorDeclarationError(f"{origin} cannot be imported ({type(err).__name__}: {err}): install what "
                                         "it needs, or uninstall that distribution") from err
    return plugins


def _check(origin: str, plugin) -> None:
    if not isinstance(plugin, EditorPlugin):
        raise EditorDeclarationError(f"{origin} gives {plugin!r}, not an EditorPlugin: point it at the module's "
                                     "`EDITOR = EditorPlugin(...)`")
    config = plugin.config
    if not (dataclasses.is_dataclass(config) and isinstance(config, type) and issubclass(config, EditorConfig)):
        raise EditorDeclarationError(f"editor={plugin.name} ({origin}): its config {config!r} is not a dataclass "
                                     "deriving from sadr.conf.schema.EditorConfig; declare it as "
                                     "`@dataclass class ...(EditorConfig)`")
    default = next(field.default for field in dataclasses.fields(config) if field.name == "name")
    if default != plugin.name:
        raise EditorDeclarationError(f"editor={plugin.name} ({origin}): its config {config.__name__} has name "
                                     f"{default!r}; give it `name: str = {plugin.name!r}`, the EditorPlugin's name")


def discover() -> dict[str, EditorPlugin]:
    editors: dict[str, EditorPlugin] = {}
    origins: dict[str, str] = {}
    for origin, plugin in _declared():
        _check(origin, plugin)
        if plugin.name in editors:
            raise EditorDeclarationError(f"two editors are named {plugin.name!r}: {origins[plugin.name]} and {origin}; "
                                         "rename the EditorPlugin (and its config's name and settings files) of one")
        editors[plugin.name], origins[plugin.name] = plugin, origin
    return editors


EDITORS: dict[str, EditorPlugin] = discover()
