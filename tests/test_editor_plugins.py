"""Editors declare themselves (sadr/editors/plugin.py): typed configs per editor, discovery, and state."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import sadr.editors.registry as registry
from sadr.conf.registry import ConfigError
from sadr.editors.plugin import EditorPlugin, EditorServices
from sadr.editors.registry import EDITORS
from sadr.models.adapters import adapter_for
from tests.editing import TEMPLATES, batch_requests, editor_config, statistics
from tests.runs import composed
from tests.tiny_models import make_model


def test_every_editor_is_a_typed_node_of_the_editor_group():
    for name, plugin in EDITORS.items():
        cfg = composed([f"editor={name}"])
        assert cfg.editor.name == name and OmegaConf.get_type(cfg.editor) is plugin.config


@pytest.mark.parametrize(("editor", "key", "config"), [
    ("memit", "rome_update=paper", "MemitConfig"),
    ("rome", "mom2_update_weight=100", "RomeConfig"),
    ("rome", "nll_loss_factor=0.5", "RomeConfig"),
    ("memit", "mom2_adjustment=false", "MemitConfig"),
])
def test_a_key_of_another_editor_fails_at_composition(editor, key, config):
    with pytest.raises(ConfigCompositionException) as failure:
        composed([f"editor={editor}", f"editor.{key}"])
    assert f"Key '{key.split('=')[0]}' not in '{config}'" in str(failure.value.__cause__)


def test_the_editor_name_cannot_be_changed_behind_its_config():
    with pytest.raises(ConfigError, match=r"editor\.name=memit does not match"):
        composed(["editor=rome", "editor.name=memit"])
    with pytest.raises(ConfigError, match=r"^editor\.name=foo does not match the editor config; choose the editor with "
                                          r"editor=<name> \(one of .*rome.*\) and leave editor\.name alone$"):
        composed(["editor=rome", "editor.name=foo"])  # a name no editor has


class _EntryPoint:
    def __init__(self, plugin):
        self.plugin = plugin

    def load(self):
        return self.plugin


def test_installed_distributions_add_editors_through_entry_points(monkeypatch):
    extra = EditorPlugin("extra", EDITORS["memit"].config, EDITORS["memit"].editor, "a third-party editor")
    monkeypatch.setattr(registry, "entry_points", lambda group: [_EntryPoint(extra)] if group == "sadr.editors" else [])
    found = registry.discover()
    assert found["extra"] is extra and set(found) == set(EDITORS) | {"extra"}
    monkeypatch.setattr(registry, "entry_points", lambda group: [_EntryPoint(EDITORS["rome"])])
    with pytest.raises(ValueError, match="two editors are named 'rome'"):
        registry.discover()


@pytest.mark.parametrize("name", EDITORS)
def test_loading_the_state_taken_before_an_edit_restores_model_and_editor_bitwise(name, tokenizer, tmp_path):
    model = make_model("llama")
    hparams = editor_config(name, v_num_grad_steps=3, context_templates=[[10, 3]])  # TEMPLATES: bare + 3 prefixes
    editor = EDITORS[name].build(model, adapter_for(model), tokenizer, hparams,
                                 EditorServices(statistics(model, tokenizer, tmp_path), TEMPLATES))
    before_model = {key: value.clone() for key, value in model.state_dict().items()}
    before = editor.state_dict()
    editor.apply(batch_requests(2))
    assert any(not torch.equal(before_model[k], v) for k, v in model.state_dict().items())
    editor.load_state_dict(before)
    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())
    assert _equal(editor.state_dict(), before)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_the_comparison_sweep_launches_every_declared_editor_with_and_without_sadr(tmp_path):
    # sadr.lambda=-1 makes the first job stop at validation, after Hydra has counted the jobs of the sweep
    done = subprocess.run([sys.executable, "-m", "sadr.cli.run", "-m", "experiment=sadr_comparison", "sadr.lambda=-1",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 2
    log = done.stdout + done.stderr
    assert f"Launching {2 * len(EDITORS)} jobs" in log, log[-2000:]
    assert f"#0 : editor={sorted(EDITORS)[0]} sadr=default " in log
