"""How an editor declares itself: its name, its typed config, and how it is built.

An editor is a module of the `sadr.editors` package (or of any installed distribution, through the
`sadr.editors` entry-point group) that defines `EDITOR = EditorPlugin(...)`. The registry collects
them, and everything else reads the registry: the `editor` config group (one typed node per editor, so a
key that editor lacks fails at composition), the runner, the sweeps (`editor: glob(*)`), the benchmarks
and the tests. Nothing else lists editor names.

What an editor carries between edits is its state (`Editor.state_dict` / `load_state_dict`): the weights
it writes and anything else it accumulates. The runner restores and checkpoints through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from typing import Callable, Sequence

from sadr.editors.base import Editor
from sadr.editors.covariance import SecondMomentStatistics
from sadr.models.adapters import ModelAdapter


@dataclass(frozen=True)
class EditorServices:
    """What the run shares with every editor: key statistics, context templates and δ-loss regularizers."""

    statistics: SecondMomentStatistics
    context_templates: list[str]
    regularizers: list = field(default_factory=list)


def edited_layers(hparams) -> list[int]:
    """`editor.layers`: the layers whose C an editor of one update per edited layer reads."""
    return list(hparams.layers)


@dataclass(frozen=True)
class EditorPlugin:
    name: str  # `editor=<name>`; also the config node's `name`
    config: type  # a dataclass deriving from sadr.conf.schema.EditorConfig, holding this editor's defaults
    editor: Callable[..., Editor]  # editor(model, adapter, tokenizer, hparams, *, statistics, context_templates, regularizers)
    summary: str  # one line: the method and its paper
    # An installed distribution's editor ships its settings files here, laid out as in sadr/conf:
    # hparams/<name>_<model>.yaml and sadr_hparams/paper/<name>_<model>.yaml (an editor of sadr/editors keeps them in
    # sadr/conf itself); e.g. importlib.resources.files("my_editor") / "conf".
    config_dir: Traversable | None = None
    # The layers whose key second moment C an edit reads, from the editor's settings (`editor.*`): where C comes from
    # ROME's files (model.stats.npz_dir), the runner checks theirs exist before it scores the unedited model.
    statistics_layers: Callable[..., Sequence[int]] = edited_layers

    def build(self, model, adapter: ModelAdapter, tokenizer, hparams, services: EditorServices) -> Editor:
        return self.editor(model, adapter, tokenizer, hparams, statistics=services.statistics,
                           context_templates=services.context_templates, regularizers=services.regularizers)
