"""Editors declare themselves (sadr/editors/plugin.py): typed configs per editor, discovery, and state."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import sadr.editors.registry as registry
from sadr.conf.validation import ConfigError
from sadr.editors.base import EditOutcome, Editor
from sadr.editors.plugin import EditorPlugin, EditorServices
from sadr.editors.registry import EDITORS
from sadr.errors import UsageError
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
    name, value = "extra", "extra_editor:EDITOR"

    def __init__(self, plugin):
        self.plugin = plugin

    def load(self):
        return self.plugin


@dataclass
class _ExtraConfig(EDITORS["memit"].config):
    name: str = "extra"


def test_installed_distributions_add_editors_through_entry_points(monkeypatch):
    extra = EditorPlugin("extra", _ExtraConfig, EDITORS["memit"].editor, "a third-party editor")
    monkeypatch.setattr(registry, "entry_points", lambda group: [_EntryPoint(extra)] if group == "sadr.editors" else [])
    found = registry.discover()
    assert found["extra"] is extra and set(found) == set(EDITORS) | {"extra"}
    monkeypatch.setattr(registry, "entry_points", lambda group: [_EntryPoint(EDITORS["rome"])])
    with pytest.raises(UsageError, match=r"^two editors are named 'rome': sadr\.editors\.rome and the sadr\.editors "
                                         r"entry point extra = extra_editor:EDITOR; rename the EditorPlugin"):
        registry.discover()


@pytest.mark.parametrize(("error", "distribution"), [
    (ModuleNotFoundError("No module named 'its_dependency'"), None),
    (ImportError("cannot import name 'gone' from 'its_dependency'"), "extra-editor"),
])
def test_an_installed_editor_that_cannot_be_imported_is_named_with_the_fix(monkeypatch, error, distribution):
    """Any ImportError, not only a missing module (a name its dependency no longer has), named with the
    distribution where the entry point knows it."""
    class Unimportable(_EntryPoint):
        dist = type("Dist", (), {"name": distribution})() if distribution else None

        def load(self):
            raise error

    monkeypatch.setattr(registry, "entry_points", lambda group: [Unimportable(None)])
    of = f" of the distribution {distribution}" if distribution else ""
    with pytest.raises(UsageError, match=rf"^the sadr\.editors entry point extra = extra_editor:EDITOR{re.escape(of)} "
                                         rf"cannot be imported \({re.escape(f'{type(error).__name__}: {error}')}\): "
                                         r"install what it needs, or uninstall that distribution$"):
        registry.discover()


@pytest.mark.parametrize("declared", [EDITORS["memit"].editor, "extra_editor:EDITOR"])
def test_an_entry_point_that_names_no_editor_plugin_is_refused_with_the_fix(monkeypatch, declared):
    monkeypatch.setattr(registry, "entry_points", lambda group: [_EntryPoint(declared)])
    with pytest.raises(UsageError, match=r"^the sadr\.editors entry point extra = extra_editor:EDITOR gives .*, not an "
                                         r"EditorPlugin: point it at the module's `EDITOR = EditorPlugin\(\.\.\.\)`$"):
        registry.discover()


@dataclass
class _NotAnEditorConfig:
    name: str = "extra"


@pytest.mark.parametrize(("config", "fix"), [
    (_NotAnEditorConfig, r"is not a dataclass deriving from sadr\.conf\.schema\.EditorConfig; declare it as "),
    (EDITORS["memit"].config, r"its config MemitConfig has name 'memit'; give it `name: str = 'extra'`"),
    (_ExtraConfig(), r"its config .*_ExtraConfig\(.*\) is not a dataclass deriving from "),  # an instance
])
def test_an_installed_editors_config_of_another_kind_or_name_is_refused_with_the_fix(monkeypatch, config, fix):
    """Hydra would reject the first only once editor=extra is composed, and take the second for a user's editor.name."""
    extra = EditorPlugin("extra", config, EDITORS["memit"].editor, "a third-party editor")
    monkeypatch.setattr(registry, "entry_points", lambda group: [_EntryPoint(extra)])
    with pytest.raises(UsageError, match=r"^editor=extra \(the sadr\.editors entry point extra = extra_editor:EDITOR\):"
                                         r" .*" + fix):
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


EXTRA_EDITOR = """
from dataclasses import dataclass
from importlib.resources import files

from sadr.editors.memit import EDITOR as MEMIT
from sadr.editors.plugin import EditorPlugin


@dataclass
class ExtraConfig(MEMIT.config):
    name: str = "extra"


EDITOR = EditorPlugin("extra", ExtraConfig, MEMIT.editor, "MEMIT under another name", files(__name__) / "conf")
"""
EXTRA_HPARAMS = "# @package editor\nsource: a test\nlayers: [2, 3]\nv_loss_layer: 29\nv_num_grad_steps: 7\n"
EXTRA_PAPER = "# @package _global_\n# source: a test\nsadr:\n  lambda: 0.25\neditor:\n  v_num_grad_steps: 11\n"


def _install_extra_editor(site, conf_files: dict[str, str]) -> dict[str, str]:
    """The distribution `extra-editor`, written into `site`: a package declaring editor=extra (MEMIT's code) through
    the sadr.editors entry points, with `conf_files` (paths under its config_dir -> text). Returns the environment of a
    Python that has it installed."""
    (site / "extra_editor").mkdir(parents=True)
    (site / "extra_editor" / "__init__.py").write_text(EXTRA_EDITOR)
    for path, text in conf_files.items():
        (site / "extra_editor" / "conf" / path).parent.mkdir(parents=True, exist_ok=True)
        (site / "extra_editor" / "conf" / path).write_text(text)
    (site / "extra_editor-0.1.dist-info").mkdir()
    (site / "extra_editor-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-editor\n"
                                                                  "Version: 0.1\n")
    (site / "extra_editor-0.1.dist-info" / "entry_points.txt").write_text(
        "[sadr.editors]\nextra = extra_editor:EDITOR\n")
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_an_installed_editor_ships_its_published_settings_in_its_config_dir(tmp_path):
    env = _install_extra_editor(tmp_path / "site", {"hparams/extra_smollm2-135m.yaml": EXTRA_HPARAMS,
                                                    "sadr_hparams/paper/extra_smollm2-135m.yaml": EXTRA_PAPER,
                                                    "hparams/README.md": "not a settings file"})
    script = ("import json; from sadr.conf.registry import compose_config\n"
              "for sadr in 'default', 'paper':\n"
              "    cfg = compose_config(['editor=extra', f'sadr={sadr}'])\n"
              "    print(json.dumps([list(cfg.editor.layers), cfg.editor.v_loss_layer, cfg.editor.v_num_grad_steps, "
              "cfg.editor.source, cfg.sadr['lambda']]))\n"
              "try:\n"
              "    compose_config(['editor=extra', 'model=gpt-j'])\n"
              "except ValueError as err:\n"
              "    print(err)\n")
    done = _run(["-c", script], env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    default, paper, elsewhere = done.stdout.splitlines()
    assert (default, paper) == ('[[2, 3], 29, 7, "a test", 0.0]', '[[2, 3], 29, 11, "a test", 0.25]')
    # a model it ships no settings for: the error names the file where its settings would be
    shipped = tmp_path / "site" / "extra_editor" / "conf"
    assert elsewhere.startswith(f"no published defaults for editor=extra with model=gpt-j "
                                f"({shipped}/hparams/extra_gpt-j.yaml does not exist)")


def test_an_installed_editors_misnamed_settings_file_is_named_with_the_fix(tmp_path):
    env = _install_extra_editor(tmp_path / "site", {"hparams/extra_gpt-jj.yaml": EXTRA_HPARAMS})
    done = _run(["-m", "sadr.cli.run", "--cfg", "job"], env, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith("error: hparams/extra_gpt-jj.yaml of editor=extra (in ")
    assert "expected a name extra_<model>.yaml, <model> one of gpt-j, gpt-neox-20b," in done.stderr


def test_sadr_paper_for_an_installed_editor_without_its_file_names_where_the_file_goes(tmp_path):
    env = _install_extra_editor(tmp_path / "site", {"hparams/extra_smollm2-135m.yaml": EXTRA_HPARAMS})
    done = _run(["-m", "sadr.cli.run", "editor=extra", "sadr=paper", f"output_dir={tmp_path / 'run'}"], env, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].endswith(
        f"as sadr_hparams/paper/extra_smollm2-135m.yaml (in {tmp_path / 'site' / 'extra_editor' / 'conf'})")
    # setup=sadr_repo's files are sadr/conf's alone, for an installed editor too
    done = _run(["-m", "sadr.cli.run", "editor=extra", "setup=sadr_repo", f"output_dir={tmp_path / 'run'}"], env,
                tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].endswith("as setup_hparams/sadr_repo/extra_smollm2-135m.yaml (in sadr/conf)")


class _Store:
    def __init__(self):
        self.stored = {}

    def store(self, group, name, node, package):
        self.stored[f"{group}/{name}"] = (OmegaConf.to_container(node), package)


def test_settings_files_are_stored_in_their_groups_and_packages_and_checked(tmp_path):
    from sadr.conf.registry import _store_settings_files

    (tmp_path / "hparams").mkdir()
    (tmp_path / "hparams" / "extra_gpt-j.yaml").write_text(EXTRA_HPARAMS)
    store = _Store()
    _store_settings_files(store, "extra", tmp_path)  # no sadr_hparams/paper folder: nothing to store from it
    assert store.stored == {"hparams/extra_gpt-j": ({"source": "a test", "layers": [2, 3], "v_loss_layer": 29,
                                                     "v_num_grad_steps": 7}, "editor")}
    (tmp_path / "sadr_hparams" / "paper").mkdir(parents=True)
    (tmp_path / "sadr_hparams" / "paper" / "extra_llama3-8b.yaml").write_text(EXTRA_PAPER)
    _store_settings_files(store, "extra", tmp_path)
    assert store.stored["sadr_hparams/paper/extra_llama3-8b"] == (
        {"sadr": {"lambda": 0.25}, "editor": {"v_num_grad_steps": 11}}, "_global_")
    # the other group's header on any line of the comment block the file opens with (Hydra would stop at the
    # first plain comment and ignore it; the file is stored under its group's package all the same)
    (tmp_path / "sadr_hparams" / "paper" / "extra_gpt-j.yaml").write_text("# source: a test\n\n" + EXTRA_HPARAMS)
    with pytest.raises(ConfigError, match=r"^sadr_hparams/paper/extra_gpt-j\.yaml of editor=extra \(in .*\) has "
                                          r"the header '# @package editor'; the files of sadr_hparams/paper have "
                                          r"'# @package _global_'$"):
        _store_settings_files(_Store(), "extra", tmp_path)
    for text, problem in (("sadr: [1\n", r"is not valid YAML: while parsing a flow sequence"),
                          ("- 1\n", r"holds ListConfig; expected keys and values, as the files of "
                                     r"sadr/conf/sadr_hparams/paper have")):
        (tmp_path / "sadr_hparams" / "paper" / "extra_gpt-j.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"^sadr_hparams/paper/extra_gpt-j\.yaml of editor=extra \(in .*\) "
                                              + problem):
            _store_settings_files(_Store(), "extra", tmp_path)
    (tmp_path / "sadr_hparams" / "paper" / "extra_gpt-j.yaml").unlink()
    (tmp_path / "hparams" / "rome_gpt-j.yaml").write_text(EXTRA_HPARAMS)  # another editor's name
    with pytest.raises(ConfigError, match=r"^hparams/rome_gpt-j\.yaml of editor=extra .*: expected a name "
                                          r"extra_<model>\.yaml"):
        _store_settings_files(_Store(), "extra", tmp_path)
    (tmp_path / "hparams" / "rome_gpt-j.yaml").unlink()
    for name in ("extra_llama3-8b.yml", "extra_llama3-8b.YAML"):  # Hydra would not read them
        (tmp_path / "hparams" / name).write_text(EXTRA_HPARAMS)
        with pytest.raises(ConfigError, match=rf"^hparams/{name}".replace(".", r"\.") + r" of editor=extra \(in .*\): "
                                              r"settings files end in \.yaml; rename it extra_llama3-8b\.yaml$"):
            _store_settings_files(_Store(), "extra", tmp_path)
        (tmp_path / "hparams" / name).unlink()
    (tmp_path / "hparams" / "extra_gpt-j.yml").write_text(EXTRA_HPARAMS)  # an old copy beside the .yaml file read
    with pytest.raises(ConfigError, match=r"^hparams/extra_gpt-j\.yml of editor=extra \(in .*\): settings files end in "
                                          r"\.yaml; extra_gpt-j\.yaml beside it is the one read: remove this one$"):
        _store_settings_files(_Store(), "extra", tmp_path)


def test_the_comparison_sweep_launches_every_declared_editor_with_and_without_sadr(tmp_path):
    """An installed editor included: `sadr-run` checks every job of a sweep before it launches one."""
    env = _install_extra_editor(tmp_path / "site", {"hparams/extra_smollm2-135m.yaml": EXTRA_HPARAMS,
                                                    "sadr_hparams/paper/extra_smollm2-135m.yaml": EXTRA_PAPER})
    # sadr.lambda=-1 fails every job's checks, so the sweep stops before any starts, having counted its jobs
    done = _run(["-m", "sadr.cli.run", "-m", "experiment=sadr_comparison", "sadr.lambda=-1",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], env, tmp_path)
    assert done.returncode == 2
    log = done.stdout + done.stderr
    jobs = 2 * (len(EDITORS) + 1)
    assert f"error: {jobs} of the sweep's {jobs} jobs cannot run, so none was started" in log, log[-2000:]
    assert f"the first: editor={sorted([*EDITORS, 'extra'])[0]} sadr=default " in log


def test_a_config_dir_that_is_not_a_folder_is_named_with_the_fix(tmp_path):
    """What a wheel built without its YAML files as package data installs: the editor's settings, silently absent."""
    from sadr.conf.registry import _store_settings_files

    with pytest.raises(ConfigError, match=r"^editor=extra names the config_dir .*/conf, which is not a folder: ship "
                                          r"its settings files with the package \(as package data\)"):
        _store_settings_files(_Store(), "extra", tmp_path / "conf")


def test_paper_settings_are_stored_even_where_the_editor_ships_no_hparams_folder(tmp_path):
    """Each group's folder is looked for on its own: a missing hparams/ does not hide sadr_hparams/paper/."""
    from sadr.conf.registry import _store_settings_files

    (tmp_path / "sadr_hparams" / "paper").mkdir(parents=True)
    (tmp_path / "sadr_hparams" / "paper" / "extra_gpt-j.yaml").write_text(EXTRA_PAPER)
    store = _Store()
    _store_settings_files(store, "extra", tmp_path)
    assert store.stored == {"sadr_hparams/paper/extra_gpt-j": (
        {"sadr": {"lambda": 0.25}, "editor": {"v_num_grad_steps": 11}}, "_global_")}


def test_an_edit_that_writes_a_weight_it_does_not_report_is_refused_side_by_side(tokenizer, tmp_path, monkeypatch):
    """Parallel cases are scored from EditOutcome.updates alone: an update left out would be scored as no edit."""
    model = make_model("llama")
    hparams = editor_config("rome", v_num_grad_steps=3, context_templates=[[10, 3]])
    editor = EDITORS["rome"].build(model, adapter_for(model), tokenizer, hparams,
                                   EditorServices(statistics(model, tokenizer, tmp_path), TEMPLATES))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    apply = type(editor).apply
    unreported = lambda self, requests: EditOutcome(seconds=apply(self, requests).seconds)  # noqa: E731
    monkeypatch.setattr(type(editor), "apply", unreported)
    monkeypatch.setattr(type(editor), "apply_each", Editor.apply_each)  # the default, through apply
    with pytest.raises(RuntimeError, match=r"^RomeEditor wrote layer\(s\) \[1\] without reporting them in "
                                           r"EditOutcome\.updates; editor\.parallel_cases"):
        editor.apply_each(batch_requests(2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored all the same


def test_an_installed_editors_paper_file_that_sets_more_than_gamma_and_steps_is_refused(tmp_path):
    """sadr=paper runs are paired with the γ = 0 runs of the same settings; a seed, or an editor key, in the file
    would leave them unpaired or change what they compare. sadr/conf's own files are held to it by test_sadr_config."""
    paper = EXTRA_PAPER + "seed: 5\n"
    paper = paper.replace("  lambda: 0.25\n", "  lambda: 0.25\n  heads: all\n")
    env = _install_extra_editor(tmp_path / "site", {"hparams/extra_smollm2-135m.yaml": EXTRA_HPARAMS,
                                                    "sadr_hparams/paper/extra_smollm2-135m.yaml": paper})
    done = _run(["-m", "sadr.cli.run", "--cfg", "job"], env, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith("error: sadr_hparams/paper/extra_smollm2-135m.yaml of editor=extra (in ")
    assert (" sets sadr.heads, seed: a sadr=paper file sets sadr.lambda and editor.v_num_grad_steps only"
            in done.stderr), done.stderr


def test_a_header_without_a_space_after_the_hash_is_read_as_hydra_reads_it(tmp_path):
    """Hydra takes '#@package editor' as a package header too (its own check is `#\\s*@`): in a sadr=paper file it is
    the wrong package, refused as '# @package editor' is."""
    from sadr.conf.registry import _store_settings_files

    (tmp_path / "sadr_hparams" / "paper").mkdir(parents=True)
    (tmp_path / "sadr_hparams" / "paper" / "extra_gpt-j.yaml").write_text(EXTRA_HPARAMS.replace("# @", "#@"))
    with pytest.raises(ConfigError, match=r"^sadr_hparams/paper/extra_gpt-j\.yaml of editor=extra \(in .*\) has the "
                                          r"header '# @package editor'; the files of sadr_hparams/paper have "
                                          r"'# @package _global_'$"):
        _store_settings_files(_Store(), "extra", tmp_path)
