"""End to end through the real config files: composition, errors, outputs, resume, determinism, sweeps."""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sadr.cli.main import app
from sadr.conf.validation import ConfigError, validate_layers
from sadr.editors.rome import RomeEditor
from sadr.evaluation.paired import compare_runs
from sadr.evaluation.probes import resolve_metrics
from sadr.runner import run_experiment
from sadr.errors import InvalidSettingError, MissingInputError
from tests.editing import random_texts
from tests.runs import FIXTURE, composed, tiny_dir, tiny_overrides, written_rows  # noqa: F401 (tiny_dir: a fixture)
from tests.tiny_models import make_model, make_sentencepiece_tokenizer


def test_every_model_and_published_default_composes():
    conf = Path(__file__).parents[1] / "sadr" / "conf"
    for model in sorted(p.stem for p in (conf / "model").glob("*.yaml")):
        local = ["model.source=x", "editor.layers=[2]", "editor.v_loss_layer=9"]
        cfg = composed([f"model={model}", *local] if model == "local" else [f"model={model}"])
        assert cfg.model.name == model
        if (conf / "hparams" / f"rome_{model}.yaml").is_file():
            assert cfg.editor.source and cfg.editor.layers, model
    gptj = composed(["model=gpt-j"])
    assert list(gptj.editor.layers) == [5] and gptj.editor.v_loss_layer == 27 and gptj.editor.mom2_adjustment


def test_runtime_keys_default_to_the_values_the_readme_gives():
    """README, "Runtime keys" and "Progress": TF32 is opt-in, the progress bar opt-out."""
    cfg = composed([])
    assert (cfg.device, cfg.dtype.name, cfg.tf32, cfg.threads, cfg.seed) == ("auto", "float32", False, None, 0)
    assert (cfg.progress.bar, cfg.progress.case_lines, cfg.save_edited) == (True, False, False)


def test_a_model_without_published_defaults_asks_for_the_layers():
    with pytest.raises(ConfigError, match=r"editor=rome with model=local.*editor.layers=\.\.\. and editor.v_loss_layer="):
        composed(["model=local", "model.source=x"])
    with pytest.raises(ConfigError, match=r"sadr/conf/hparams/memit_local\.yaml does not exist\): set editor\.layers="):
        composed(["model=local", "model.source=x", "editor=memit"])


def test_a_missing_model_path_is_named_before_the_layers_it_would_need(tmp_path):
    """A mistyped folder or GGUF file is the mistake to fix first: with it fixed, the layers may come from the model."""
    for source, kind in ((tmp_path / "typo", "model directory"), (tmp_path / "typo.gguf", "GGUF file"),
                         ("runs/seq/edited_model", "model directory")):  # relative, but no hub id has two '/'
        with pytest.raises(MissingInputError, match=rf"^{kind} {source} does not exist \(model.source\)$"):
            composed(["model=local", f"model.source={source}"])
    assert composed(["model=local", f"model.source={tmp_path}", "editor.layers=[1]", "editor.v_loss_layer=1"])


def test_a_misspelt_key_added_with_plus_names_the_key_it_resembles():
    with pytest.raises(ConfigError, match=r"^\+editor\.v_lrr: editor has no setting 'v_lrr', so nothing would read "
                                          r"it; did you mean editor\.v_lr \(set without '\+'\)\? editor's settings: "
                                          r"name, "):
        composed(["+editor.v_lrr=0.1"])


def test_negative_lambda_is_rejected():
    with pytest.raises(ConfigError, match=r"sadr.lambda=-1.0"):
        composed(["sadr.lambda=-1"])


def test_threads_must_be_positive():
    with pytest.raises(ConfigError, match=r"threads=0: must be >= 1"):
        composed(["threads=0"])


def test_batch_size_needs_a_batch_protocol():
    with pytest.raises(ConfigError, match="editor.protocol=batch"):
        composed(["editor.batch_size=4"])


@pytest.mark.parametrize("extra, message", [
    (["editor.v_num_grad_steps=0"], r"editor\.v_num_grad_steps=0: must be >= 1"),
    (["editor.protocol=batch", "editor.batch_size=0"], r"editor\.batch_size=0: must be >= 1"),
    (["editor.v_lr=-1"], r"editor\.v_lr=-1\.0: must be a finite number > 0"),
    (["editor.v_lr=nan"], r"editor\.v_lr=nan: must be a finite number > 0"),
    (["editor.clamp_norm_factor=0"], r"editor\.clamp_norm_factor=0\.0: must be a finite number > 0"),
    (["editor.v_weight_decay=-0.5"], r"editor\.v_weight_decay=-0\.5: must be a finite number >= 0"),
    (["editor.kl_factor=inf"], r"editor\.kl_factor=inf: must be a finite number >= 0"),
    (["editor=memit", "editor.mom2_update_weight=nan"], r"editor\.mom2_update_weight=nan: must be a finite number > 0"),
    (["editor=pmet", "editor.mom2_update_weight=0"], r"editor\.mom2_update_weight=0\.0: must be a finite number > 0"),
    (["editor=alphaedit", "editor.nullspace_threshold=-1"], r"editor\.nullspace_threshold=-1\.0: must be a finite number > 0"),
    (["editor=alphaedit", "editor.L2=-10"], r"editor\.L2=-10\.0: must be a finite number >= 0"),
    (["editor=pmet", "editor.nll_loss_factor=0"], r"editor\.nll_loss_factor=0\.0: must be a finite number > 0"),
    (["editor.context_templates=[[5]]"], r"editor\.context_templates entry \[5\]: expected \[max_tokens, count\]"),
    (["editor.context_templates=[[5,-1]]"], r"editor\.context_templates entry \[5, -1\]"),
    (["model.family=foo"], r"model\.family=foo: not a supported family .*supported: .*gpt2.*llama"),
    (["eval.batch_size=0"], r"^eval\.batch_size=0: must be >= 1"),
    (["device=gpu"], r"^device=gpu: expected auto, cpu, cuda, cuda:N \(N a GPU's index\) or mps"),
    (["device=cuda:x"], r"^device=cuda:x: expected auto"),
    (["editor.v_lr=0"], r"editor\.v_lr=0\.0: must be a finite number > 0"),
    (["editor=alphaedit", "editor.nullspace_threshold=0"], r"editor\.nullspace_threshold=0\.0: must be a finite number > 0"),
    (["editor.layers=[]"], r"^editor\.layers is empty; give the layer\(s\) to edit"),
    (["model=gpt-j", "editor=memit", "editor.v_loss_layer=6"], r"^editor\.v_loss_layer=6 is below the edited layer 8"),
    (["editor.context_templates=[[5,5,5]]"], r"editor\.context_templates entry \[5, 5, 5\]: expected"),
])
def test_settings_outside_their_domain_are_rejected_at_composition(extra, message):
    with pytest.raises(ConfigError, match=message):
        composed(extra)


def test_the_loss_may_be_read_at_the_edited_layer_itself():
    """MEMIT and ROME read the loss after δ is added, so v_loss_layer equal to the edited layer still sees δ."""
    cfg = composed(["model=gpt-j", "editor.layers=[5]", "editor.v_loss_layer=5"])
    assert cfg.editor.v_loss_layer == max(cfg.editor.layers) == 5


def test_layers_must_exist_in_the_loaded_model():
    """A model with 4 layers has layers 0..3: each of the last one accepted and the first one beyond it refused."""
    editor = composed(["model=local", "model.source=x", "editor.layers=[3]", "editor.v_loss_layer=3"]).editor
    validate_layers(editor, 4)
    for key, value in (("layers", [4]), ("v_loss_layer", 4)):
        beyond = editor.copy()
        beyond[key] = value
        with pytest.raises(ConfigError, match=re.escape(f"editor.{key}={value}: the model has layers 0..3")):
            validate_layers(beyond, 4)


def test_layers_exist_from_layer_0_and_every_one_is_checked():
    """On a 4-layer model layer 0 is the first that exists and -1 none; one layer outside among several is enough, and
    with both keys outside the message names both."""
    editor = composed(["model=local", "model.source=x", "editor.layers=[3]", "editor.v_loss_layer=3"]).editor
    inside = editor.copy()
    inside.layers, inside.v_loss_layer = [0, 3], 0
    validate_layers(inside, 4)
    for key, value in (("layers", [3, 4]), ("layers", [-1, 0]), ("v_loss_layer", -1)):
        outside = editor.copy()
        outside[key] = value
        with pytest.raises(ConfigError, match=re.escape(f"editor.{key}={value}: the model has layers 0..3")):
            validate_layers(outside, 4)
    both = editor.copy()
    both.layers, both.v_loss_layer = [5], 6
    with pytest.raises(ConfigError, match=re.escape("editor.layers=[5] and editor.v_loss_layer=6: the model has "
                                                    "layers 0..3;")):
        validate_layers(both, 4)


@pytest.mark.parametrize("extra", [
    ["threads=1"], ["eval.batch_size=1"], ["editor.v_num_grad_steps=1"], ["device=cuda:12"], ["device=mps"],
    ["sadr.layers=[0]"], ["editor.context_templates=[[10,0]]"],
    ["editor.protocol=batch", "editor.batch_size=2", "editor.parallel_cases=1"],
    ["save_edited=true", "editor.parallel_cases=1"],
])
def test_settings_at_the_edge_of_their_domain_compose(extra):
    """The least value each message accepts (">= 1", layer indices ">= 0", a count of 0 templates), a GPU index of
    two digits, and parallel_cases=1, which is one case at a time, so any protocol and save_edited go with it."""
    composed(extra)  # no ConfigError


def test_float32_statistics_settings_reach_the_statistics(tiny_dir, tmp_path):
    from sadr.models.loading import load_model
    from sadr.runner import build_statistics

    loaded = load_model(str(tiny_dir / "model"), device="cpu", cache_dir=str(tiny_dir / "cache"))
    for setting, dtype in ((None, torch.float64), ("float32", torch.float32)):
        chosen = [f"model.stats.product_dtype={setting}", f"model.stats.factor_dtype={setting}"] if setting else []
        statistics = build_statistics(composed(tiny_overrides(tiny_dir, tmp_path, *chosen)), loaded, "f")
        assert statistics.product_dtype == statistics.factor_dtype == dtype
        assert ("products" in statistics.description()) == (setting is not None)
    for key in ("product_dtype", "factor_dtype"):
        with pytest.raises(Exception, match=key):
            composed(tiny_overrides(tiny_dir, tmp_path, f"model.stats.{key}=float16"))
    for setting, on_host in ((None, False), ("model", False), ("cpu", True)):
        chosen = [f"model.stats.factor_device={setting}"] if setting else []
        assert build_statistics(composed(tiny_overrides(tiny_dir, tmp_path, *chosen)), loaded, "f").factors_on_host is on_host
    with pytest.raises(Exception, match="factor_device"):
        composed(tiny_overrides(tiny_dir, tmp_path, "model.stats.factor_device=cuda"))


def _sadr_run(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sadr.cli.run", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_run_writes_config_environment_rows_and_metrics(tiny_dir, tmp_path):
    out = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run")))
    assert (out / "config.yaml").is_file()
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["torch"] and env["device"] == "cpu" and env["n_cases"] == 2
    assert env["stats_corpus"]["kind"] == "file"
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == [0, 1]
    first = rows[0]
    assert first["protocol"] == "single" and first["editor"] == "rome" and first["sadr_lambda"] == 0.0
    assert set(first["edited"]) >= {"efficacy", "paraphrase", "neighborhood"}
    assert first["unedited"].keys() <= first["edited"].keys()  # edited also holds entries derived from both states
    assert {"covariance", "k_star", "v_star", "update", "eval_per_case"} <= set(first["seconds"])
    records = {str(r["case_id"]): r["requested_rewrite"] for r in json.loads(FIXTURE.read_text())}
    assert (first["subject"], first["target_new"]) == (records[str(first["case_id"])]["subject"],
                                                       records[str(first["case_id"])]["target_new"]["str"])
    table = pd.read_csv(out / "metrics.csv")
    assert set(table.protocol) == {"prompt", "case"} and set(table.state) == {"edited", "unedited"}
    es = table[(table.metric == "efficacy") & (table.protocol == "case") & (table.state == "edited") & (table.quantity == "value")]
    assert es["n"].item() == 2
    assert es["mean"].item() == pytest.approx(100 * sum(r["edited"]["efficacy"]["value"][0] for r in rows) / 2)


def test_same_config_twice_gives_identical_metrics(tiny_dir, tmp_path):
    a = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "a")))
    b = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "b")))
    pd.testing.assert_frame_equal(pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv"))


def test_killed_run_resumes_without_redoing_finished_cases(tiny_dir, tmp_path, monkeypatch):
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run"))
    out = run_experiment(cfg)
    complete = (out / "cases.jsonl").read_text().splitlines()
    # as if killed while writing the second row
    (out / "cases.jsonl").write_text(complete[0] + "\n" + complete[1][:40])
    (out / "metrics.csv").unlink()
    edited = []
    original = RomeEditor.apply
    monkeypatch.setattr(RomeEditor, "apply", lambda self, requests: (edited.extend(r.subject for r in requests), original(self, requests))[1])
    run_experiment(cfg)
    resumed = (out / "cases.jsonl").read_text().splitlines()
    assert len(edited) == 1  # case 1 only
    assert resumed[0] == complete[0]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in resumed] == [strip(x) for x in complete]
    assert (out / "metrics.csv").is_file()


def test_a_finished_run_run_again_writes_its_metrics_again_without_building_an_editor(tiny_dir, tmp_path,
                                                                                     monkeypatch):
    """As a deleted metrics.csv is made again: from the rows, without the editor's one-off work (its templates and
    key statistics, minutes at paper scale)."""
    from sadr.runner import Experiment

    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor.protocol=sequential"))
    out = run_experiment(cfg)
    metrics = (out / "metrics.csv").read_text()
    (out / "metrics.csv").unlink()
    monkeypatch.setattr(Experiment, "_editor", lambda self: pytest.fail("an editor built with no case to edit"))
    assert run_experiment(cfg) == out and (out / "metrics.csv").read_text() == metrics


@pytest.mark.parametrize("block", [1, 5, 64, 1 << 20])
def test_a_last_line_cut_short_is_found_reading_only_the_end_of_the_rows(block, tmp_path, monkeypatch):
    """Whatever the block read at a time from the end, the line after the last newline is the one checked, and the
    file is read only about that far back (a paper-scale run's rows take gigabytes)."""
    from sadr import results
    from sadr.results import RunDirectory

    monkeypatch.setattr(results, "TAIL_BLOCK", block)
    run = RunDirectory(tmp_path / "run")
    file = tmp_path / "run" / "cases.jsonl"
    rows = "".join(json.dumps({"case_id": i, "text": "x" * (i % 7)}) + "\n" for i in range(300))
    read = []
    real_open = open

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def read(self, *args):
            data = self.handle.read(*args)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    counting = lambda *args, **kwargs: Counting(real_open(*args, **kwargs))  # noqa: E731
    for tail, kept in ((b'{"case_id": 300, "te', rows), (b'{"case_id": 300}', rows + '{"case_id": 300}\n'),
                       (b"", rows)):
        file.write_bytes(rows.encode() + tail)
        read.clear()
        with monkeypatch.context() as patched:
            patched.setattr("builtins.open", counting)
            patched.setattr(io, "open", counting)  # what pathlib reads with
            run.drop_partial_line()
        assert sum(read) <= 1 + 2 * len(tail) + 2 * block
        assert file.read_text() == kept
    for tail, kept in ((b'{"case_id": 0, "te', ""), (b'{"case_id": 0}', '{"case_id": 0}\n')):  # the only line
        file.write_bytes(tail)
        run.drop_partial_line()
        assert file.read_text() == kept


def test_only_a_last_line_cut_short_is_taken_for_a_kill_any_other_bad_line_is_named(tmp_path, monkeypatch, caplog):
    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    rows = [json.dumps({"case_id": i}) for i in range(3)]
    file = tmp_path / "run" / "cases.jsonl"
    file.write_text("\n".join(rows) + "\n" + rows[0][:5])  # a kill while the fourth row was written
    assert [row["case_id"] for row in run.rows()] == [0, 1, 2]
    writes = []
    real_open = io.open
    spy = lambda path, mode="r", *args, **kwargs: (  # noqa: E731
        writes.append(mode) if "w" in mode else None, real_open(path, mode, *args, **kwargs))[1]
    monkeypatch.setattr(io, "open", spy)  # what pathlib opens files with
    monkeypatch.setattr("builtins.open", spy)
    run.drop_partial_line()
    monkeypatch.undo()
    assert writes == []  # cut in place: a file opened for writing is empty until written back, losing rows to a kill
    assert file.read_text() == "\n".join(rows) + "\n"
    # said, so that a case redone by the rerun is not a surprise
    assert re.search(r"dropped the last line of .*cases\.jsonl, cut short \(5 bytes\) by a kill .*its case is redone",
                     caplog.text)
    caplog.clear()
    file.write_text("\n".join(rows))  # a whole row, killed just before its newline: kept, as rows() counts it
    run.drop_partial_line()
    assert "dropped" not in caplog.text
    assert file.read_text() == "\n".join(rows) + "\n" and len(run.rows()) == 3
    run.drop_partial_line()  # a file that ends with its newline is left as it is, and nothing is said
    assert "dropped" not in caplog.text and file.read_text() == "\n".join(rows) + "\n"
    file.write_text("\n".join(rows) + "\n\n")  # blank lines are no rows, and no damage
    assert len(run.rows()) == 3
    # a damaged line before the end would silently drop the finished rows after it, so it is an error
    file.write_text("\n".join([rows[0], rows[1][:5], rows[2]]) + "\n")
    with pytest.raises(DamagedFileError, match=r"line 2 of .*cases\.jsonl is not a whole JSON row .*delete that line"):
        run.rows()
    file.write_text("\n".join([rows[0], rows[1][:5]]) + "\n")  # a whole last line that does not parse: not a kill
    with pytest.raises(DamagedFileError, match=r"line 2 of"):
        run.rows()
    for line in ("[1, 2]", '{"subject": "x"}'):  # JSON, but no case's row: compare and summarize failed on it
        file.write_text("\n".join([rows[0], line]) + "\n")
        with pytest.raises(DamagedFileError, match=r"line 2 of .*cases\.jsonl is not a case's row .*delete that line"):
            run.rows()


def test_a_second_invocation_in_a_run_directory_in_use_stops_at_once(tiny_dir, tmp_path):
    """Launched twice, or requeued while the first still runs, a job would append the same cases again."""
    from sadr.results import RunConflictError, RunDirectory

    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run"))
    with RunDirectory(tmp_path / "run").working():
        with pytest.raises(RunConflictError, match=r"another sadr-run is working in .*run.*hydra\.run\.dir"):
            run_experiment(cfg)
    assert not (tmp_path / "run" / "cases.jsonl").exists()
    run_experiment(cfg)  # the lock goes with the invocation that held it
    assert len(RunDirectory(tmp_path / "run").rows()) == 2


def test_a_folder_that_cannot_be_locked_runs_as_before_with_a_warning(tmp_path, monkeypatch, caplog):
    """A file system without locks (an NFS mount without its lock daemon) must not stop runs that worked before."""
    import filelock

    from sadr.results import RunDirectory

    def no_locks(self, *args, **kwargs):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(filelock.FileLock, "acquire", no_locks)
    with caplog.at_level(logging.WARNING, logger="sadr.results"), RunDirectory(tmp_path / "run").working():
        pass
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_key_added_with_plus_is_checked_only_where_a_schema_declares_the_keys():
    from omegaconf import OmegaConf

    from sadr.conf.registry import compose_config
    from sadr.conf.validation import unknown_keys

    assert [key for key, _ in unknown_keys(compose_config(["+sadr.lamda=0.1"], checked=False))] == ["sadr.lamda"]
    assert unknown_keys(OmegaConf.create({"weights": {"anything": 1.0}})) == []  # a plug-in's Dict node
    compose_config([], hydra=True)  # Hydra's own node is not the run's


def test_a_composed_config_holds_hydra_s_node_only_when_asked():
    """compose_config(hydra=False), what scripts and benchmarks take as the run's config, holds the run's settings
    alone (those of RunConfig), as a run's config.yaml does; hydra=True adds Hydra's node."""
    import dataclasses

    from sadr.conf.registry import compose_config
    from sadr.conf.schema import RunConfig

    assert set(compose_config([])) == {field.name for field in dataclasses.fields(RunConfig)}
    assert set(compose_config([], hydra=True)) == {field.name for field in dataclasses.fields(RunConfig)} | {"hydra"}


def test_a_damaged_sequential_checkpoint_is_named_with_the_fix(tiny_dir, tmp_path):
    from sadr.errors import DamagedFileError

    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor.protocol=sequential"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sequential_state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DamagedFileError, match=r"sequential checkpoint .*sequential_state\.pt cannot be read .*delete it"):
        run_experiment(cfg)


@pytest.mark.parametrize("cut", [1, 5])
def test_a_sequential_checkpoint_whose_pickle_is_cut_short_is_named_with_the_fix(cut, tmp_path):
    """A whole zip whose data.pkl ends early: unpickling it raises EOFError or IndexError, by where it ends."""
    import zipfile

    from sadr.errors import DamagedFileError
    from sadr.runner import _read_checkpoint

    torch.save({"edited": ["0"], "seconds": {}}, tmp_path / "whole.pt")
    with zipfile.ZipFile(tmp_path / "whole.pt") as whole:
        files = {name: whole.read(name) for name in whole.namelist()}
    with zipfile.ZipFile(tmp_path / "cut.pt", "w") as damaged:
        for name, data in files.items():
            damaged.writestr(name, data[:cut] if name.endswith("/data.pkl") else data)
    with pytest.raises(DamagedFileError, match=r"sequential checkpoint .*cut\.pt cannot be read .*delete it"):
        _read_checkpoint(tmp_path / "cut.pt")


def test_resuming_with_a_different_config_is_refused(tiny_dir, tmp_path):
    from sadr.results import RunConflictError

    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1")))
    with pytest.raises(RunConflictError, match=r"differs in: dataset\.limit \(1 in the run, 2 now\)\); resume only "
                                                r"with identical settings \(the run's values, in .*config\.yaml"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=2")))


def test_config_differences_name_each_setting_with_both_values():
    """A refused resume names every differing key, however deep, with the run's value and the one given now, both as
    an override writes them (so the run's value can be given back: a newer sadr may have changed a default)."""
    from sadr.results import config_differences

    run = {"seed": 0, "eval": {"metrics": ["efficacy"], "batch_size": 64}, "editor": {"name": "rome"}}
    now = {"seed": 0, "eval": {"metrics": ["efficacy", "commonsense"], "batch_size": 64}, "editor": {"name": "rome",
                                                                                                      "v_steps": 20}}
    assert config_differences(run, now) == [
        "editor.v_steps ((absent) in the run, 20 now)",
        "eval.metrics ([efficacy] in the run, [efficacy,commonsense] now)"]
    assert config_differences(run, run) == []
    deep = config_differences({"model": {"stats": {"sample_length": 64}}}, {"model": {"stats": {"sample_length": 128}}})
    assert deep == ["model.stats.sample_length (64 in the run, 128 now)"]  # every level of the key, not the last two
    assert config_differences({"a": [None, True, 1.5, "it's here", "x/y-1.z", "12", "true"]}, {"a": {"b": False}}) == [
        "a ([null,true,1.5,'it\\'s here',x/y-1.z,'12','true'] in the run, {b:false} now)"]
    assert config_differences({"a": "x" * 500}, {"a": "y"}) == ["a (" + "x" * 397 + "... in the run, y now)"]
    assert config_differences({"a": "x" * 400}, {"a": "y"}) == ["a (" + "x" * 400 + " in the run, y now)"]  # fits
    # the words "nan" and "inf" (any case) are floats to an override, so as text they are quoted like "true"
    assert config_differences({"a": ["nan", "Inf", "info"]}, {"a": "NaN"}) == ["a (['nan','Inf',info] in the run, 'NaN' now)"]


def test_config_differences_name_a_section_that_became_a_value_or_went_as_one_setting():
    """A section (a dict) in the run that is a plain value, or absent, now is one difference under its own key, not
    its keys one by one."""
    from sadr.results import config_differences

    assert config_differences({"a": {"b": 1}}, {"a": 2}) == ["a ({b:1} in the run, 2 now)"]
    assert config_differences({"a": {"b": 1}, "c": 0}, {"c": 0}) == ["a ({b:1} in the run, (absent) now)"]


def test_rows_read_stop_at_a_last_line_without_its_newline_whatever_is_appended_after(tmp_path):
    """A whole row without its newline is the file's last line as the reader found it: what a writer appends meanwhile
    (the rest of that line, then other rows) is not read as rows of its own."""
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    file = tmp_path / "run" / "cases.jsonl"
    file.write_text('{"case_id": 0}\n{"case_id": 1}')
    rows = run.iter_rows()
    assert [next(rows)["case_id"], next(rows)["case_id"]] == [0, 1]
    with open(file, "a") as f:
        f.write('\n{"case_id": 2}\n')
    assert list(rows) == []


def test_an_empty_rows_file_is_left_as_it_is_when_a_run_resumes(tmp_path):
    """A run killed before its first row leaves cases.jsonl empty: nothing to drop, and no error."""
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    (tmp_path / "run" / "cases.jsonl").write_bytes(b"")
    run.drop_partial_line()
    assert (tmp_path / "run" / "cases.jsonl").read_bytes() == b"" and run.count() == 0


def test_a_run_resumes_with_other_execution_settings_but_not_with_other_results_settings(tiny_dir, tmp_path, capsys,
                                                                                         caplog):
    """Where C's factors are kept and how many cases (or fluency texts) run side by side do not change what a run
    computes (beyond float rounding), so a run stopped for lack of GPU memory resumes with them changed; the factors'
    precision does. Its log and table title count one case, then none left, in the right number."""
    from sadr.results import RunConflictError

    caplog.set_level(logging.INFO, logger="sadr.runner")
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1")))
    assert "rome on local / offline_counterfact (1 case, protocol=single" in capsys.readouterr().out
    assert "unedited model scored on 1 case in" in caplog.text and "1 case to edit (0 already finished" in caplog.text
    threads = torch.get_num_threads()
    try:
        resumed = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1", "threads=1",
                                                         "model.stats.factor_device=cpu", "editor.parallel_cases=2",
                                                         "eval.generation_batch_size=3")))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "0 cases to edit (1 already finished" in caplog.text
    environment = json.loads((resumed / "environment.json").read_text())
    assert environment["factor_device"] == "cpu" and environment["threads"] == 1
    assert environment["generation_batch_size"] == 3
    assert "factor_device" not in (resumed / "config.yaml").read_text()
    assert "generation_batch_size" not in (resumed / "config.yaml").read_text()
    with pytest.raises(RunConflictError, match=r"differs in: model"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1",
                                               "model.stats.factor_dtype=float32")))


def test_a_run_that_finished_no_case_may_restart_with_other_settings(tmp_path):
    """Its mistake fixed, a run that stopped before any case can be started again in the same directory."""
    from omegaconf import OmegaConf

    from sadr.results import DELTA_CHECKPOINT, SEQUENTIAL_STATE, RunConflictError, RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.claim(OmegaConf.create({"editor": {"layers": [9]}}))
    run.claim(OmegaConf.create({"editor": {"layers": [2]}}))
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").editor.layers == [2]
    # a sequential run's checkpointed edits (its rows come only at the end), or a finished case, are work to keep
    (tmp_path / "run" / SEQUENTIAL_STATE).write_bytes(b"")
    with pytest.raises(RunConflictError, match=r"differs in: editor"):
        run.claim(OmegaConf.create({"editor": {"layers": [3]}}))
    (tmp_path / "run" / SEQUENTIAL_STATE).unlink()
    (tmp_path / "run" / DELTA_CHECKPOINT).mkdir()  # a stopped group's δs, which a rerun reads back
    (tmp_path / "run" / DELTA_CHECKPOINT / "000000.pt").write_bytes(b"")
    with pytest.raises(RunConflictError, match=r"differs in: editor.*delete .*delta_checkpoint$"):
        run.claim(OmegaConf.create({"editor": {"layers": [3]}}))
    (tmp_path / "run" / DELTA_CHECKPOINT / "000000.pt").unlink()
    run.append({"case_id": 0})
    with pytest.raises(RunConflictError, match=r"differs in: editor"):
        run.claim(OmegaConf.create({"editor": {"layers": [3]}}))


def test_deleting_the_kept_deltas_is_offered_only_to_a_run_that_holds_nothing_else(tmp_path):
    """A run with finished cases or checkpointed sequential edits still refuses other settings once its δs are gone,
    so its refusal does not offer their deletion."""
    from omegaconf import OmegaConf

    from sadr.results import DELTA_CHECKPOINT, SEQUENTIAL_STATE, RunConflictError, RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.claim(OmegaConf.create({"editor": {"layers": [9]}}))
    (tmp_path / "run" / DELTA_CHECKPOINT).mkdir()
    (tmp_path / "run" / DELTA_CHECKPOINT / "000000.pt").write_bytes(b"")
    (tmp_path / "run" / SEQUENTIAL_STATE).write_bytes(b"")
    with pytest.raises(RunConflictError, match=r"differs in: editor") as refused:
        run.claim(OmegaConf.create({"editor": {"layers": [3]}}))
    assert "give up the δs" not in str(refused.value)
    (tmp_path / "run" / SEQUENTIAL_STATE).unlink()
    run.append({"case_id": 0})
    with pytest.raises(RunConflictError, match=r"differs in: editor") as refused:
        run.claim(OmegaConf.create({"editor": {"layers": [3]}}))
    assert "give up the δs" not in str(refused.value)


def test_held_run_names_only_a_run_that_a_claim_would_refuse_and_writes_nothing(tmp_path):
    """What a sweep's checks ask of each job's folder before any job starts: None for a folder without a run, a run
    of the same settings, or one that finished nothing; else each difference, and whether only kept δs are held."""
    from omegaconf import OmegaConf

    from sadr.results import DELTA_CHECKPOINT, HeldRun, RunDirectory

    same, other = OmegaConf.create({"editor": {"layers": [9]}}), OmegaConf.create({"editor": {"layers": [3]}})
    assert RunDirectory(tmp_path / "none", make=False).held_run(same) is None
    assert not (tmp_path / "none").exists()
    run = RunDirectory(tmp_path / "run")
    run.claim(same)
    assert run.held_run(other) is None  # finished nothing: a claim replaces its config
    (tmp_path / "run" / DELTA_CHECKPOINT).mkdir()
    (tmp_path / "run" / DELTA_CHECKPOINT / "000000.pt").write_bytes(b"")
    held = run.held_run(other)
    assert isinstance(held, HeldRun) and held.only_deltas and len(held.differences) == 1
    assert held.differences == ["editor.layers ([9] in the run, [3] now)"] and held.keys == ["editor.layers"]
    run.append({"case_id": 0})
    assert run.held_run(same) is None
    assert run.held_run(other).only_deltas is False
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").editor.layers == [9]


def test_a_delta_checkpoint_folder_without_a_chunk_keeps_no_delta(tmp_path):
    """What a kill while the first chunk was written leaves (its temporary file) holds no δ to read back: the run
    takes other settings, as one that kept nothing."""
    from omegaconf import OmegaConf

    from sadr.results import DELTA_CHECKPOINT, RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.claim(OmegaConf.create({"editor": {"layers": [9]}}))
    (tmp_path / "run" / DELTA_CHECKPOINT).mkdir()
    (tmp_path / "run" / DELTA_CHECKPOINT / "000000.pt.k2x9q.tmp").write_bytes(b"PK")
    assert not run.deltas_kept()
    run.claim(OmegaConf.create({"editor": {"layers": [3]}}))
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").editor.layers == [3]


def test_a_config_yaml_that_holds_an_execution_setting_resumes_with_it_changed(tmp_path):
    """sadr before eval.generation_batch_size was known to change no result wrote it into config.yaml: such a run
    resumes with it changed, as a run written since does."""
    from omegaconf import OmegaConf

    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("editor:\n  layers: [1]\neval:\n  generation_batch_size: 8\n")
    run.append({"case_id": 0})
    run.claim(OmegaConf.create({"editor": {"layers": [1]}, "eval": {"generation_batch_size": 3}}))


def test_a_row_is_flushed_and_synced_to_disk_before_append_returns(tmp_path, monkeypatch):
    """A machine that goes down (not only the process) keeps every row counted as finished."""
    from sadr.results import RunDirectory

    run, synced, real_fsync = RunDirectory(tmp_path / "run"), [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real_fsync(fd))[1])
    run.append({"case_id": 0})
    run.append({"case_id": 1})
    assert synced == [len('{"case_id": 0}\n'), len('{"case_id": 0}\n{"case_id": 1}\n')]


@pytest.mark.parametrize("stop, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, r"terminated \(SIGTERM\)")])
def test_ctrl_c_or_sigterm_keeps_the_finished_cases_says_so_and_the_same_command_resumes(stop, status, said, tiny_dir,
                                                                                        tmp_path):
    """SIGTERM is what a SLURM job's time limit sends."""
    out = tmp_path / "run"
    offline = Path(__file__).parents[1] / "sadr" / "data" / "offline" / "counterfact_offline.json"
    overrides = [o for o in tiny_overrides(tiny_dir, out) if not o.startswith(("dataset.path=", "dataset.limit="))]
    args = [sys.executable, "-m", "sadr.cli.run", *overrides, f"dataset.path={offline}", "dataset.limit=4",
            "editor.v_num_grad_steps=20", "editor.early_stop=false", "progress.bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    # SIGINT as a terminal delivers it, even when the suite itself runs with it ignored (started in the background)
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    rows = out / "cases.jsonl"
    deadline = time.monotonic() + 300
    while not (rows.is_file() and rows.read_text()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=300)
    kept = len(rows.read_text().splitlines())
    assert process.returncode == status and "Traceback" not in stderr, stderr[-3000:]
    # the next case's δ, when the signal comes after it is optimised and before that case's row, is kept too
    assert re.search(rf"^{said}: {kept} finished case\(s\)( and the δs optimised so far in the edit in progress)? are "
                     rf"kept in (.*run); to resume \(finished work is skipped\), run the same command with "
                     rf"hydra\.run\.dir=\2$", stderr, re.MULTILINE), stderr[-3000:]
    assert 1 <= kept < 4
    resumed = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first_four = [record["case_id"] for record in json.loads(offline.read_text())[:4]]
    assert [json.loads(line)["case_id"] for line in rows.read_text().splitlines()] == first_four


def test_running_out_of_gpu_memory_midway_says_what_is_kept_and_how_to_resume(tiny_dir, tmp_path):
    """Through the command line: the error names the settings that fit and the finished case kept, without a
    traceback, and the rerun with the named setting skips that case."""
    out = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys, torch\n"
        "from sadr.cli.run import main\n"
        "from sadr.editors.rome import RomeEditor\n"
        "original, edited = RomeEditor.apply, []\n"
        "def apply(self, requests):\n"
        "    edited.append(len(requests))\n"
        "    if len(edited) > 1:\n"
        "        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "    return original(self, requests)\n"
        "RomeEditor.apply = apply\n"
        "sys.argv[0] = 'sadr-run'\n"
        "main()\n")
    overrides = [*tiny_overrides(tiny_dir, out), "progress.bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    stopped = subprocess.run([sys.executable, str(driver), *overrides], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert re.search(r"^error: editing ran out of GPU memory \(CUDA out of memory. Tried to allocate 2.00 GiB\)\. "
                     r"model\.stats\.factor_device=cpu .*; 1 finished case\(s\) are kept in (.*run): a rerun with "
                     r"hydra\.run\.dir=\1 skips them$", stopped.stderr, re.MULTILINE), stopped.stderr[-3000:]
    first = (out / "cases.jsonl").read_text().splitlines()
    resumed = _sadr_run(*overrides, "model.stats.factor_device=cpu", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (out / "cases.jsonl").read_text().splitlines()
    assert len(first) == 1 and rows[0] == first[0] and len(rows) == 2


def test_missing_dataset_file_is_a_clear_error(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset\.path"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", f"dataset.path={tmp_path / 'nope.json'}")))


def test_multirun_sweep_and_summarize(tiny_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_dir, sweep) if not o.startswith("output_dir=")]
    done = _sadr_run("-m", *overrides, "sadr.lambda=0,0.01", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.rglob("metrics.csv"))) == 2
    # every sweep ends with its tables, printed and written as `sadr summarize` then writes them again
    assert re.search(rf"^wrote {re.escape(str(sweep / 'summary.csv'))}, ", done.stdout, re.MULTILINE), done.stdout[-3000:]
    at_sweep_end = {name: (sweep / name).read_text() for name in ("summary.md", "paired.md")}
    summary = subprocess.run([sys.executable, "-m", "sadr.cli.main", "summarize", str(sweep)], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    assert {name: (sweep / name).read_text() for name in at_sweep_end} == at_sweep_end
    table = pd.read_csv(sweep / "summary.csv")
    edited = table[table.state == "edited"]
    assert sorted(edited["sadr.lambda"]) == [0.0, 0.01]
    assert {"ES", "PS", "NS", "ES ci95"} <= set(table.columns)
    assert (table.state == "unedited").sum() == 1
    assert set(table.n_cases) == {2}  # records edited, while n_obs counts the prompts behind a prompt-level mean
    assert (table.n_obs >= 2).all()
    assert "| sadr.lambda" in (sweep / "summary.md").read_text() or "sadr.lambda" in (sweep / "summary.md").read_text()
    # the γ = 0.01 run paired with its γ = 0 run, exactly as `sadr compare` pairs them
    paired = pd.read_csv(sweep / "paired.csv", dtype={"base_run": str, "run": str})
    assert set(paired["sadr.lambda"]) == {0.01} and set(paired.base_run) == {"0"} and set(paired.run) == {"1"}
    direct = compare_runs(sweep / "0", sweep / "1")
    pd.testing.assert_frame_equal(paired[direct.columns].reset_index(drop=True), direct, check_dtype=False)
    assert "prompt by prompt" in summary.stdout and (sweep / "paired.md").is_file()


def test_summarize_reports_a_directory_without_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sadr.cli.main", "summarize", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no finished runs" in done.stderr
    mistyped = subprocess.run([sys.executable, "-m", "sadr.cli.main", "summarize", str(tmp_path / "nope")],
                              capture_output=True, text=True)
    assert mistyped.returncode == 2 and "does not exist" in mistyped.stderr
    assert not (tmp_path / "nope").exists()  # a mistyped folder is not made


def test_summarize_refuses_an_unknown_protocol_before_looking_for_runs(tmp_path):
    """Any other protocol would select no rows and write an empty table."""
    done = CliRunner().invoke(app, ["summarize", str(tmp_path), "--protocol", "prompts"])
    assert done.exit_code == 2 and "'prompts' is not one of" in " ".join(re.sub("[│╭╮╰╯─]", " ", done.output).split()), \
        done.output
    assert not list(tmp_path.iterdir())  # the message, test_paired.py checks


def test_summarize_names_the_unfinished_runs_when_none_has_finished(tmp_path):
    from omegaconf import OmegaConf

    from sadr.evaluation.summary import find_runs
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "killed")
    run.claim(OmegaConf.create({"editor": {"name": "rome"}}))
    run.append({"case_id": 0})
    run.append({"case_id": 1})
    with pytest.raises(FileNotFoundError, match=r"no finished runs .*unfinished runs.*killed \(2 finished cases\)"):
        find_runs(tmp_path)


def test_summarize_names_three_unfinished_runs_and_counts_the_others(tmp_path):
    from omegaconf import OmegaConf

    from sadr.evaluation.summary import find_runs
    from sadr.results import RunDirectory

    for name in ("a", "b", "c", "d"):
        RunDirectory(tmp_path / name).claim(OmegaConf.create({"editor": {"name": "rome"}}))
    with pytest.raises(FileNotFoundError, match=r"\): .*a \(0 finished cases\); .*b .*; .*c \(0 finished cases\) and 1 "
                                                r"more$"):
        find_runs(tmp_path)


def test_a_loss_layer_below_the_edited_layer_is_rejected():
    with pytest.raises(ConfigError, match=r"editor.v_loss_layer=3 is below the edited layer 5"):
        composed(["model=gpt-j", "editor.v_loss_layer=3"])


def test_an_edited_layer_beyond_the_loss_layer_names_editor_layers_too():
    """editor.layers=[40] on a 30-layer model is a mistake in editor.layers, not in v_loss_layer: the message names both."""
    with pytest.raises(ConfigError, match=r"editor.v_loss_layer=29 is below the edited layer 40.*editor.layers=\[40\]"):
        composed(["editor.layers=[40]"])


def test_a_damaged_line_before_an_unfinished_last_one_is_named(tmp_path):
    """Only the last line can be cut by a kill: a bad line before it is damage, even when the file does not end
    with a newline, else the finished rows after it would be silently dropped."""
    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    rows = [json.dumps({"case_id": i}) for i in range(3)]
    (tmp_path / "run" / "cases.jsonl").write_text("\n".join([rows[0], rows[1][:5], rows[2]]))
    with pytest.raises(DamagedFileError, match=r"line 2 of"):
        run.rows()


def test_rows_are_read_a_line_at_a_time_with_the_same_rules(tmp_path):
    """`iter_rows` yields each row before it reads on: the rows before a damaged line come, then the error. Only the
    last line is known to be last once no line follows it: cut short there it is left out, cut short before another
    line it is damage."""
    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    rows = [json.dumps({"case_id": i}) for i in range(3)]
    file = tmp_path / "run" / "cases.jsonl"
    file.write_text("\n".join([rows[0], rows[1], rows[2][:5], rows[2]]) + "\n")
    read = run.iter_rows()
    assert [next(read)["case_id"], next(read)["case_id"]] == [0, 1]
    with pytest.raises(DamagedFileError, match=r"line 3 of .*cases\.jsonl is not a whole JSON row"):
        next(read)
    file.write_text("\n".join(rows) + "\n" + rows[0][:5])
    assert [row["case_id"] for row in run.iter_rows()] == [0, 1, 2] and run.count() == 3
    file.write_text("\n".join([rows[0], rows[1][:5], rows[2]]))
    with pytest.raises(DamagedFileError, match=r"line 2 of"):
        run.count()


def test_rows_lines_end_at_a_carriage_return_as_they_did_when_the_file_was_read_whole(tmp_path):
    """A file saved with CRLF reads the same, and a lone carriage return ends a line: damage is named by the line
    number that reading the whole file and splitting it gave."""
    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    file = tmp_path / "run" / "cases.jsonl"
    file.write_bytes(b'{"case_id": 0}\r\n{"case_id": 1}\r\n')
    assert run.finished() == {"0", "1"}
    file.write_bytes(b'{"case_id": 0}\r{"case_id": 1}\r{"case_id": 2, \n{"case_id": 3}\n')
    with pytest.raises(DamagedFileError, match=r"line 3 of"):
        run.rows()
    file.write_bytes(b'{"case_id": 0}\n{"case_id": 1}\r{"case_id": 2, ')  # the last line, cut short
    assert run.finished() == {"0", "1"}
    file.write_bytes(b'{"case_id": 0}\n{"case_id": 1, \r{"case_id": 2}')  # cut short before the last line: damage
    with pytest.raises(DamagedFileError, match=r"line 2 of"):
        run.rows()


def test_metrics_csv_from_rows_cut_to_their_scores_is_the_table_of_the_whole_rows(tiny_dir, tmp_path):
    """The runner builds metrics.csv from rows read a line at a time and cut to what the table reads
    (`scored_fields`), so a run's attention blobs, texts and diagnostics are never held at once: the file is byte for
    byte the table of the whole rows, on rows with magnitudes, drift, subject attention and fluency."""
    from sadr.evaluation.aggregate import metric_table, scored_fields

    out = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "eval.generation=true",
                                                 "eval.generation_length=30")))
    rows = written_rows(out)
    assert {"subject_attention", "fluency", "drift_max", "drift_argmax"} <= set(rows[0]["edited"])
    whole = metric_table(rows)
    assert set(whole.quantity) == {"value", "magnitude", "harmonic_mean"}
    assert (out / "metrics.csv").read_bytes() == whole.to_csv(index=False).encode()
    cut = [scored_fields(row) for row in rows]
    assert set(cut[0]["edited"]["subject_attention"]) == {"value"} and set(cut[0]["edited"]["fluency"]) == {"value"}
    pd.testing.assert_frame_equal(metric_table(cut), whole)


def test_eval_drift_false_and_eval_batch_size_reach_the_prompt_metrics(tiny_dir, tmp_path, monkeypatch):
    """eval.drift=false: no subject attention is read and no drift entry is written, in either state (drift is on by
    default); eval.batch_size: the prompt scorer runs batches of that many rows."""
    from sadr.evaluation import prompt_metrics

    sizes, score = [], prompt_metrics.score_pairs_detailed

    def recording(model, tokenizer, prompts, targets, batch_size, **kwargs):
        sizes.append(batch_size)
        return score(model, tokenizer, prompts, targets, batch_size, **kwargs)

    monkeypatch.setattr(prompt_metrics, "score_pairs_detailed", recording)
    out = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "eval.drift=false", "eval.batch_size=3",
                                                 f"cache_dir={tmp_path / 'cache'}")))
    rows = written_rows(out)
    assert len(rows) == 2 and sizes and set(sizes) == {3}
    for row in rows:
        for state in ("edited", "unedited"):
            assert "distract_neighborhood" in row[state]
            assert not {"subject_attention", "drift_max", "drift_mean", "drift_argmax"} & set(row[state])


def test_where_and_how_results_are_written_do_not_stop_a_resume(tmp_path):
    """The run folder (a run moved, or resumed under another hydra.run.dir), the progress display and save_edited
    change no result: a run with a finished case resumes with them changed, and config.yaml does not hold them."""
    from omegaconf import OmegaConf

    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    settings = {"output_dir": "/a", "progress": {"bar": True}, "save_edited": False, "editor": {"layers": [1]}}
    run.claim(OmegaConf.create(settings))
    run.append({"case_id": 0})
    run.claim(OmegaConf.create({**settings, "output_dir": "/b", "progress": {"bar": False}, "save_edited": True}))
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "run" / "config.yaml")) == {"editor": {"layers": [1]}}


def test_the_run_s_seed_reaches_its_context_templates_and_its_generated_corpus(tiny_dir, tmp_path):
    """Both are sampled: a run with seed=3 draws what seed 3 draws, not what the default seed 0 does."""
    from sadr.data.corpus import generated_corpus
    from sadr.editors.context_templates import context_templates
    from sadr.models.loading import load_model
    from sadr.runner import build_statistics, editor_templates

    loaded = load_model(str(tiny_dir / "model"), device="cpu", cache_dir=str(tmp_path))
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "seed=3", "model.stats.corpus=generated", "model.stats.n_samples=2",
                                  "model.stats.sample_length=8", f"cache_dir={tmp_path / 'cache'}"))
    drawn = {seed: context_templates(loaded.model, loaded.tokenizer, [[5, 5]], seed=seed, fingerprint="f",
                                     cache_dir=tmp_path / "own", style=cfg.editor.context_template_style.name)
             for seed in (0, 3)}
    assert drawn[0] != drawn[3]
    assert editor_templates(cfg, loaded, "f") == drawn[3]
    batch_tokens = cfg.model.stats.batch_tokens
    texts = {seed: list(generated_corpus(loaded.model, loaded.tokenizer, 2, 8, seed, batch_tokens).texts()) for seed in (0, 3)}
    assert texts[0] != texts[3]
    assert list(build_statistics(cfg, loaded, "f").corpus.texts()) == texts[3]


def test_passes_over_a_generated_corpus_sample_it_once_and_a_stopped_pass_resumes_on_the_same_texts(
        tiny_dir, tmp_path, monkeypatch):
    """The run's generated corpus is cached under the run's cache_dir: a pass stopped by Ctrl-C, its rerun and a
    pass over other layers (another editor's) all read the texts sampled first, and the resumed C is the C of a pass
    never stopped."""
    from sadr.data import corpus as corpus_module
    from sadr.editors import covariance
    from sadr.models.loading import load_model
    from sadr.runner import build_statistics

    loaded = load_model(str(tiny_dir / "model"), device="cpu", cache_dir=str(tmp_path))
    sampled = []
    sampled_batches = corpus_module.sampled_batches
    monkeypatch.setattr(corpus_module, "sampled_batches", lambda *args, **kwargs: sampled.append(1) or sampled_batches(
        *args, **kwargs))

    def statistics(cache: Path):
        cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "model.stats.corpus=generated",
                                      "model.stats.n_samples=12", "model.stats.sample_length=8",
                                      "model.stats.batch_tokens=24", f"cache_dir={cache}"))
        return build_statistics(cfg, loaded, "f")

    accumulate = covariance.accumulate_second_moments

    def stopped_after_nine_texts(model, adapter, tokenizer, layers, texts, *args, checkpoint, **kwargs):
        def nine():
            yield from itertools.islice(texts, 9)
            raise KeyboardInterrupt
        checkpoint.every_seconds = 0.0
        return accumulate(model, adapter, tokenizer, layers, nine(), *args, checkpoint=checkpoint, **kwargs)

    monkeypatch.setattr(covariance, "accumulate_second_moments", stopped_after_nine_texts)
    with pytest.raises(KeyboardInterrupt):
        statistics(tmp_path / "cache").take([1])
    assert sampled == [1] and list((tmp_path / "cache").rglob("*.partial.pt"))
    monkeypatch.setattr(covariance, "accumulate_second_moments", accumulate)
    resumed = statistics(tmp_path / "cache").take([1])[1]
    other_layers = statistics(tmp_path / "cache").take([2])
    assert sampled == [1] and 2 in other_layers
    never_stopped = statistics(tmp_path / "fresh").take([1])[1]
    assert sampled == [1, 1]
    torch.testing.assert_close(resumed, never_stopped, rtol=1e-6, atol=1e-9)


def test_a_prompt_longer_than_the_model_s_positions_stops_the_run_before_any_work(tiny_dir, tmp_path):
    """The tiny llama has 128 positions; a model with learned position embeddings failed in torch with a traceback."""
    records = json.loads(FIXTURE.read_text())
    records[1]["neighborhood_prompts"] = ["word " * 200 + "is in"]
    (tmp_path / "long.json").write_text(json.dumps(records))
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", f"dataset.path={tmp_path / 'long.json'}"))
    with pytest.raises(InvalidSettingError, match=r"^case 1: a prompt of neighborhood_prompts needs \d+ tokens"):
        run_experiment(cfg)
    assert not (tmp_path / "run" / "cases.jsonl").exists()


def test_a_damaged_config_yaml_is_named_with_the_fix_on_resume_and_in_summaries(tmp_path):
    from omegaconf import OmegaConf

    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.claim(OmegaConf.create({"editor": {"layers": [2]}}))
    run.append({"case_id": 0})
    (tmp_path / "run" / "config.yaml").write_text("editor: {layers: [2]\n")  # cut short
    (tmp_path / "run" / "metrics.csv").write_text("state\n")
    expected = r"run/config\.yaml cannot be read \(.*line 2.*\); it was damaged or edited: delete it, and a rerun"
    with pytest.raises(DamagedFileError, match=expected):
        run.claim(OmegaConf.create({"editor": {"layers": [2]}}))
    done = CliRunner().invoke(app, ["summarize", str(tmp_path)])
    assert done.exit_code == 2 and re.match(f"error: .*{expected}", done.output) and done.output.count("\n") == 1


@pytest.mark.parametrize("text, problem", [("", r"cannot be read \(No columns to parse from file\)"),
                                           ("a,b\n1,2\n", r"lacks the column\(s\) state, metric, label")])
def test_a_damaged_metrics_csv_is_named_with_the_fix_in_summaries_and_reports(tmp_path, text, problem):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("editor: {name: rome}\n")
    (tmp_path / "run" / "metrics.csv").write_text(text)
    for command in ("summarize", "report"):
        done = CliRunner().invoke(app, [command, str(tmp_path)])
        assert done.exit_code == 2, done.output
        assert re.match(rf"error: .*run/metrics\.csv {problem}.*; it was damaged or edited: delete it, and a rerun of "
                        r"the run's own command writes it again", done.output) and done.output.count("\n") == 1


def test_sadr_help_names_its_arguments_as_its_text_does_and_joins_wrapped_lines():
    done = CliRunner().invoke(app, ["summarize", "--help"], env={"COLUMNS": "200"})
    usage = next(line for line in done.output.splitlines() if "Usage:" in line)
    assert done.exit_code == 0 and "ROOT" in usage, done.output
    assert "the metrics evaluated, paired.csv, paired.md and paired.tex" in done.output  # one paragraph, not its lines


def test_sadr_without_a_command_shows_its_help_with_the_commands():
    """`sadr` alone is asked what it does: the help, naming its three commands, not a "Missing command" error."""
    done = CliRunner().invoke(app, [], env={"COLUMNS": "200"})
    assert "Tables and utilities for sadr-run results." in done.output, done.output
    assert all(command in done.output for command in ("summarize", "compare", "report")), done.output
    assert "Missing command" not in done.output


def test_a_misspelt_override_is_named_with_the_setting_it_may_mean():
    """What sadr-run adds to Hydra's message when an override's key is declared nowhere (Hydra advises '+')."""
    from sadr.conf.advice import misspelt_override

    assert misspelt_override(["model.stats.n_sample=3"]).startswith(
        "model.stats.n_sample: model.stats has no setting 'n_sample'; did you mean model.stats.n_samples? ")
    assert misspelt_override(["editor=pmet", "dtype=bfloat16", "editor.nll_loss_factr=2"]).startswith(
        "editor.nll_loss_factr: editor has no setting 'nll_loss_factr'; did you mean editor.nll_loss_factor? ")
    assert "it is a setting of editor=rome, not of editor=memit" in misspelt_override(["editor=memit", "editor.rome_update=paper"])
    declared = ["-m", "--config-name=config", "model=gpt-j", "hydra/launcher=local", "experiment=table3_gptj",
                "setup=sadr_repo", "+x.y=1", "~sadr.lambda=0",
                "editor.rome_update=paper", "model.stats.n_samples=3", "sadr.lambda=0,0.01", "hydra.sweep.dir=d"]
    assert misspelt_override(declared) is None  # the default editor is ROME, which has rome_update
    assert misspelt_override(["editor=rome,memit", "editor.layerz=[1]"]) is None  # swept editors: not one to name


def test_help_says_what_sadr_run_does_and_lists_the_groups(tmp_path):
    done = _sadr_run("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("sadr-run edits facts into a language model") and "powered by Hydra" not in done.stdout
    assert "\n\n== Configuration groups ==" in done.stdout and "editor: alphaedit, memit, pmet, rome" in done.stdout


@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_the_key_statistics_are_made_before_the_progress_over_cases_starts(editor, tiny_dir, tmp_path, monkeypatch):
    """The pass and C's factors are one-off work: made inside the first case, they counted as its time, and the bar
    showed a rate and ETA of that (hours for a 20-case run that took minutes)."""
    import sadr.runner
    from sadr.editors.covariance import SecondMomentStatistics

    events = []
    factorized, enter = SecondMomentStatistics.factorized, sadr.runner.Progress.__enter__
    monkeypatch.setattr(SecondMomentStatistics, "factorized",
                        lambda self, layers: (factorized(self, layers), events.append("factors made"))[0])
    monkeypatch.setattr(sadr.runner.Progress, "__enter__", lambda self: events.append(self.label) or enter(self))
    extra = ["editor=memit", "editor.layers=[1,2]", "editor.mom2_update_weight=1"] if editor == "memit" else []
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", *extra, f"cache_dir={tmp_path / 'cache'}")))
    # the unedited scores, the pass, the factors, then the cases
    assert events[:4] == ["scoring the unedited model", "key statistics", "factors made", "progress"]


def test_a_misspelt_metric_fails_before_the_model_loads(tiny_dir, tmp_path):
    """The metrics are checked with the config, before the model: the metric is named, not the folder that holds no
    model (which only loading finds), and no run folder is made."""
    (tmp_path / "no_model").mkdir()
    with pytest.raises(InvalidSettingError, match=r"unknown metric\(s\) \['neighbourhood'\] in eval\.metrics"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "eval.metrics=[efficacy,neighbourhood]",
                                               f"model.source={tmp_path / 'no_model'}")))
    assert not (tmp_path / "run").exists()


def test_environment_names_a_dataset_file_given_by_a_relative_path_absolutely(tiny_dir, tmp_path, monkeypatch):
    """environment.json says which file the records came from: `dataset.path=records.json` names no file once the
    run directory is read from elsewhere."""
    (tmp_path / "records.json").write_bytes(FIXTURE.read_bytes())
    monkeypatch.chdir(tmp_path)
    run = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.path=records.json",
                                                 "dataset.limit=1")))
    environment = json.loads((run / "environment.json").read_text())
    assert environment["dataset_source"] == str((tmp_path / "records.json").resolve())


def test_a_metric_given_by_its_table_label_is_named_with_the_metric_it_labels():
    """The tables print ES, NS, zsRE-E: given as eval.metrics, the error gives the names to use instead."""
    with pytest.raises(InvalidSettingError, match=r"unknown metric\(s\) \['ES', 'zsre-e'\] in eval\.metrics; known: .*;"
                                                  r" ES, zsre-e: the tables' labels, not metric names: did you mean "
                                                  r"eval\.metrics=\[efficacy,neighborhood,token_efficacy\]\?$"):
        resolve_metrics(["ES", "neighborhood", "zsre-e"])


def test_metrics_that_apply_to_no_case_fail_before_the_model_loads(tiny_dir, tmp_path):
    """CS and DCS on CounterFact records (which have no commonsense questions) would edit every case for an empty
    table: refused at once, naming the metrics these cases do have; an empty list is let through."""
    from sadr.data.load import load_cases
    from sadr.evaluation.probes import check_metrics_apply, resolve_metrics

    (tmp_path / "no_model").mkdir()  # holds no model, which only loading would find
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "eval.metrics=[commonsense,distract_commonsense]",
                                  f"model.source={tmp_path / 'no_model'}"))
    with pytest.raises(InvalidSettingError, match=r"^eval\.metrics=\[commonsense,distract_commonsense\]: none has a "
                                                  r"prompt in the 2 case\(s\) of dataset=offline_counterfact; choose "
                                                  r"among those that do: efficacy, paraphrase, neighborhood, "
                                                  r"distract_neighborhood, relation$"):
        run_experiment(cfg)
    cases = load_cases(cfg.dataset, tmp_path).cases
    check_metrics_apply([], cases, "offline_counterfact")
    check_metrics_apply(resolve_metrics(["commonsense", "relation"]), cases, "offline_counterfact")


def test_a_key_no_editor_node_may_hold_is_not_said_to_be_another_editor_s():
    """Only a key of the editor node is looked up among the other editors: sadr.v_lr is a misspelling in sadr, not
    ROME's v_lr (with and without '+')."""
    from sadr.conf.advice import misspelt_override

    settings = "sadr's settings: lambda, heads, layers, divergence, epsilon, in_stop_rule"  # SadrConfig's fields
    assert misspelt_override(["sadr.v_lr=0.1"]) == f"sadr.v_lr: sadr has no setting 'v_lr'; {settings}"
    with pytest.raises(ConfigError) as raised:
        composed(["+sadr.v_lr=0.1"])
    assert str(raised.value) == f"+sadr.v_lr: sadr has no setting 'v_lr', so nothing would read it; {settings}"


def test_a_key_named_hydra_below_the_top_is_no_setting_either():
    """Only the top-level `hydra` node is Hydra's own; `+sadr.hydra=1` is a key that nothing reads."""
    with pytest.raises(ConfigError, match=r"^\+sadr\.hydra: sadr has no setting 'hydra', so nothing would read it"):
        composed(["+sadr.hydra=1"])


def test_another_editor_s_key_added_with_plus_names_that_editor():
    with pytest.raises(ConfigError, match=r"^\+editor\.rome_update: editor has no setting 'rome_update', so nothing "
                                          r"would read it; it is a setting of editor=rome, not of editor=memit; "):
        composed(["editor=memit", "+editor.rome_update=paper"])


@pytest.mark.parametrize("extra", [["editor.kl_factor=0"], ["editor.v_weight_decay=0"], ["editor=alphaedit", "editor.L2=0"]])
def test_a_weight_that_may_be_zero_composes_at_zero(extra):
    """'>= 0' weights: 0 leaves the term out (no KL term, no weight decay, no L2 penalty), which is a valid run."""
    key = extra[-1].partition("=")[0]
    assert composed(extra).editor[key.removeprefix("editor.")] == 0


def test_a_cuda_device_needs_its_index_after_the_colon():
    assert composed(["device=cuda:1"]).device == "cuda:1"  # checked when the run loads the model, not here
    with pytest.raises(ConfigError, match=r"^device=cuda:: expected auto, cpu, cuda, cuda:N"):
        composed(["device=cuda:"])


def test_a_local_model_without_its_folder_is_named_when_the_config_is_built():
    with pytest.raises(ConfigError, match=r"^model=local needs model\.source: a local model folder, a GGUF file or a "
                                          r"hub id"):
        composed(["model=local", "editor.layers=[1]", "editor.v_loss_layer=1"])


@pytest.mark.parametrize("extra, needs", [
    (["editor.context_templates=[[5,5],[130,5]]"], r"requested_rewrite\.prompt needs \d+ tokens with its answer and a "
                                                   r"context template"),
    (["eval.generation=true", "eval.generation_style=fixed", "eval.generation_length=130"],
     r"generation_prompts needs \d+ tokens and the sampled tokens"),
])
def test_what_a_run_adds_to_its_prompts_counts_against_the_model_s_positions(tiny_dir, tmp_path, extra, needs):
    """The tiny llama has 128 positions: a 130-token context template before the edit prompt, or 130 tokens sampled
    after a generation prompt, cannot fit whatever the prompt."""
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", *extra))
    with pytest.raises(InvalidSettingError, match=rf"^case 0: a prompt of {needs}, more than the model's 128 positions"):
        run_experiment(cfg)
    assert not (tmp_path / "run" / "cases.jsonl").exists()


def test_a_generated_text_longer_than_the_model_s_positions_is_refused(tiny_dir, tmp_path):
    """ROME's style grows each text to eval.generation_length tokens in all, whatever its prompt."""
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "eval.generation=true", "eval.generation_length=129"))
    with pytest.raises(InvalidSettingError, match=r"^eval\.generation_length=129: longer than the model's 128 "
                                                  r"positions; set it to at most 128$"):
        run_experiment(cfg)
    assert not (tmp_path / "run" / "cases.jsonl").exists()


@pytest.mark.parametrize("data, problem", [
    (b"state,metric\nedited,efficacy\nedited,efficacy,1,2\n", r"cannot be read \(Error tokenizing data\. C error: "
                                                               r"Expected 2 fields in line 3, saw 4"),
    (b"state,metric\n\xff\xfe\n", r"cannot be read \('utf-8' codec can't decode"),
])
def test_a_metrics_csv_that_is_not_csv_text_is_named_with_the_fix(tmp_path, data, problem):
    """A row with more fields than the header, and bytes that are not UTF-8."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("editor: {name: rome}\n")
    (tmp_path / "run" / "metrics.csv").write_bytes(data)
    done = CliRunner().invoke(app, ["summarize", str(tmp_path)])
    assert done.exit_code == 2, done.output
    assert re.match(rf"error: .*run/metrics\.csv {problem}.*; it was damaged or edited: delete it", done.output)


@pytest.mark.parametrize("line", ["7", '"case_id"', "null"])
def test_a_json_value_that_is_no_object_is_no_case_s_row(tmp_path, line):
    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "cases.jsonl").write_text(json.dumps({"case_id": 0}) + "\n" + line + "\n")
    with pytest.raises(DamagedFileError, match=r"line 2 of .*cases\.jsonl is not a case's row \(a JSON object with its "
                                               r"case_id\)"):
        RunDirectory(tmp_path / "run").rows()


def test_a_case_s_second_row_is_named_as_damage_not_counted_twice(tmp_path):
    """Two invocations appending at once (a file system without locks) write a case twice: metrics.csv counted both
    rows (n 4 for 3 cases) while `sadr compare` kept one, so the tables disagreed without a word."""
    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    for case in (0, 1, 2, "1"):  # ids are compared as text, as resume and compare key them
        run.append({"case_id": case, "edited": {}})
    message = r"line 4 of .*cases\.jsonl is a second row of case 1 \(line 2 is its first\).*delete one of the two lines"
    with pytest.raises(DamagedFileError, match=message):
        run.rows()
    with pytest.raises(DamagedFileError, match=message):
        run.count()  # what a rerun checks first: it stops instead of writing a metrics.csv that counts case 1 twice
    done = CliRunner().invoke(app, ["compare", str(tmp_path / "run"), str(tmp_path / "run")])
    assert done.exit_code == 2 and re.match("error: " + message, done.output), done.output


def test_a_blank_line_between_rows_is_no_row_and_no_damage(tmp_path):
    """A blank line before the last (an editor's, say) is skipped: neither damage nor a case."""
    from sadr.results import RunDirectory

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "cases.jsonl").write_text('{"case_id": 0}\n\n  \n{"case_id": 1}\n')
    assert [row["case_id"] for row in RunDirectory(tmp_path / "run").rows()] == [0, 1]


def test_a_config_yaml_that_is_gone_is_not_called_damaged(tmp_path):
    """Damage is in a file's content; a file that is not there (or cannot be opened) is the OS's error, as it is."""
    from sadr.results import read_config

    with pytest.raises(FileNotFoundError):  # DamagedFileError is no OSError
        read_config(tmp_path / "config.yaml")


def test_a_kill_at_any_byte_of_a_row_with_a_non_ascii_subject_keeps_the_finished_rows(tmp_path):
    """Rows hold subjects such as "Zoë Ñandú": whichever byte a kill stops the third row's write at (inside a
    character included), the two finished rows read back, and dropping the cut line leaves exactly them; a third row
    that only lacks its newline counts and is kept."""
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    for i, subject in enumerate(["Zoë Ñandú", "Jörn Halvass", "Ærø Ğülşen"]):
        run.append({"case_id": i, "subject": subject})
    file = tmp_path / "run" / "cases.jsonl"
    whole = file.read_bytes()
    two_rows = whole[: whole.index(b"\n", whole.index(b"\n") + 1) + 1]
    for cut in range(len(two_rows) + 1, len(whole)):
        file.write_bytes(whole[:cut])
        finished = 3 if cut == len(whole) - 1 else 2
        assert [row["case_id"] for row in run.rows()] == list(range(finished)), cut
        run.drop_partial_line()
        assert file.read_bytes() == (whole if finished == 3 else two_rows), cut
        assert [row["subject"] for row in run.rows()][:2] == ["Zoë Ñandú", "Jörn Halvass"]


def test_a_line_of_spaces_in_cases_jsonl_is_a_blank_line_not_damage(tmp_path):
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    (tmp_path / "run" / "cases.jsonl").write_text('{"case_id": 0}\n  \t\n{"case_id": 1}\n')
    assert [row["case_id"] for row in run.rows()] == [0, 1]


def _killed_halfway(write):
    """`write` (text to a path) cut short by a kill: half the text is written, then the process stops."""
    def half_then_kill(target, text, *args, **kwargs):
        write(target, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    return half_then_kill


def test_a_kill_while_config_yaml_is_rewritten_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """A run that finished no case takes a corrected config; killed while writing it, the directory still holds the
    previous config.yaml whole (not half a file, which the next resume would report as damaged)."""
    from omegaconf import OmegaConf

    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.claim(OmegaConf.create({"editor": {"layers": [9]}, "dataset": {"name": "zsre", "limit": 40}}))
    before = (tmp_path / "run" / "config.yaml").read_text()
    monkeypatch.setattr(Path, "write_text", _killed_halfway(Path.write_text))
    with pytest.raises(KeyboardInterrupt):
        run.claim(OmegaConf.create({"editor": {"layers": [2]}, "dataset": {"name": "zsre", "limit": 40}}))
    monkeypatch.undo()
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_a_kill_while_metrics_csv_is_rewritten_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    first = pd.DataFrame({"metric": ["efficacy", "paraphrase"], "mean": [100.0, 50.0]})
    run.write_metrics(first)
    real_to_csv = pd.DataFrame.to_csv

    def half_then_kill(table, target, *args, **kwargs):
        text = real_to_csv(table, None, *args, **kwargs)
        Path(target).write_text(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_kill)
    with pytest.raises(KeyboardInterrupt):
        run.write_metrics(pd.DataFrame({"metric": ["efficacy", "paraphrase"], "mean": [0.0, 25.0]}))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "metrics.csv"), first)


def test_a_line_of_cases_jsonl_that_is_not_utf8_is_named_as_damage(tmp_path):
    """Rows are written as ASCII JSON, so bytes that are not UTF-8 (a disk error, an edit saved as Latin-1) are damage:
    named with their line and the fix, as any other damaged line, not a UnicodeDecodeError with a traceback."""
    from sadr.errors import DamagedFileError
    from sadr.results import RunDirectory

    run = RunDirectory(tmp_path / "run")
    file = tmp_path / "run" / "cases.jsonl"
    file.write_bytes(b'{"case_id": 0}\n{"case_id": 1, "subject": "Zo\xeb"}\n{"case_id": 2}\n')
    with pytest.raises(DamagedFileError, match=r"line 2 of .*cases\.jsonl is not a whole JSON row \(not UTF-8 text\); "
                                               r".*delete that line"):
        run.rows()


@pytest.mark.parametrize("editor, extra", [("rome", []), ("memit", ["editor.mom2_update_weight=1"])])
def test_an_edit_reaches_its_target_with_a_sentencepiece_tokenizer(editor, extra, tmp_path):
    """A tiny llama with a tokenizer like Llama-2's own (tokenizer.json with the "▁" prepended by its normalizer, byte
    fallback, BOS first, no pad token): the new object ends up well ahead of the true one, as with the byte-level
    tokenizer. The subject ends the prompt and the new object is one piece ("▁Zürich"): in a random tiny model only
    then does the edit move the prediction far (a many-token object moves little, with either tokenizer)."""
    tokenizer = make_sentencepiece_tokenizer(legacy=True)
    make_model("llama", tokenizer=tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n\n".join(random_texts()))
    (tmp_path / "cases.json").write_text(json.dumps([{
        "case_id": 0, "requested_rewrite": {"prompt": "The capital city of {}", "relation_id": "P36", "subject": "France",
                                            "target_new": {"str": "Zürich"}, "target_true": {"str": "Paris"}},
        "paraphrase_prompts": ["Maps were redrawn. The capital city of France"],
        "neighborhood_prompts": ["The capital city of Spain"], "attribute_prompts": [], "generation_prompts": []}]))
    cfg = composed(tiny_overrides(tmp_path, tmp_path / "run", f"editor={editor}", "dataset.limit=1",
                                  f"dataset.path={tmp_path / 'cases.json'}", "editor.v_num_grad_steps=30",
                                  "editor.v_weight_decay=0", *extra))
    run_experiment(cfg)
    (row,) = written_rows(tmp_path / "run")
    odds = {state: row[state]["efficacy"]["p_good"][0] / row[state]["efficacy"]["p_bad"][0]
            for state in ("unedited", "edited")}
    assert row["edited"]["efficacy"]["value"] == [1.0]
    assert odds["edited"] > 2.5 * odds["unedited"], odds


def test_a_missing_statistics_file_or_folder_fails_before_the_model_loads(tiny_dir, tmp_path):
    """model.stats.text_file and model.stats.npz_dir are checked before the model (minutes at paper scale): the
    setting is named, not the folder that holds no model, which only loading finds."""
    (tmp_path / "no_model").mkdir()
    no_model = f"model.source={tmp_path / 'no_model'}"
    with pytest.raises(FileNotFoundError, match=r"^statistics text file .*absent\.txt does not exist"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "a", no_model,
                                               f"model.stats.text_file={tmp_path / 'absent.txt'}")))
    with pytest.raises(FileNotFoundError, match=r"^model\.stats\.npz_dir=.*absent is not a folder"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "b", no_model,
                                               f"model.stats.npz_dir={tmp_path / 'absent'}")))
    (tmp_path / "npz").mkdir()  # ROME's files of another sample count only
    np.savez(tmp_path / "npz" / "model.layers.1.mlp.down_proj_float32_mom2_40.npz", **{"mom2.mom2": np.eye(2)})
    with pytest.raises(FileNotFoundError, match=r"^model\.stats\.npz_dir=.*npz holds no ROME statistics file of "
                                                r"model\.stats\.n_samples=41 texts"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "c", no_model, "model.stats.n_samples=41",
                                               f"model.stats.npz_dir={tmp_path / 'npz'}")))


@pytest.mark.parametrize("model, corpus", [("smollm2-135m", "generated"), ("gpt2-xl", "hub")])
def test_the_auto_statistics_corpus_is_generated_for_the_embedded_model_and_read_from_the_hub_otherwise(model, corpus,
                                                                                                        monkeypatch):
    from types import SimpleNamespace

    from sadr import runner

    read = []
    monkeypatch.setattr(runner, "generated_corpus", lambda *args, **kwargs: read.append("generated"))
    monkeypatch.setattr(runner, "hub_corpus", lambda *args: read.append("hub"))
    monkeypatch.setattr(runner, "SecondMomentStatistics", lambda *args, **kwargs: None)
    cfg = composed([f"model={model}", "model.stats.corpus=auto"])
    runner.build_statistics(cfg, SimpleNamespace(model=None, tokenizer=None, adapter=None), "fingerprint")
    assert read == [corpus]


def test_statistics_files_are_required_only_where_they_are_read(tiny_dir, tmp_path):
    """With model.stats.npz_dir no corpus is read, so its text file is not required (it was, with corpus=file); ROME
    without the mom2 adjustment reads no C, so neither its layer's ROME file, nor a folder of them, nor a corpus is
    required, and its environment.json names no statistics corpus."""
    width = json.loads((tiny_dir / "model" / "config.json").read_text())["intermediate_size"]
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "model.layers.1.mlp.down_proj_float32_mom2_40.npz",
             **{"mom2.mom2": np.eye(width, dtype=np.float32), "mom2.count": np.array(1)})
    no_text = (f"model.stats.text_file={tmp_path / 'absent.txt'}", f"model.stats.npz_dir={folder}",
               "model.stats.n_samples=40")
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "memit", "editor=memit", *no_text)))
    environment = json.loads((tmp_path / "memit" / "environment.json").read_text())
    assert environment["stats_corpus"] == {"kind": "rome_npz", "dir": str(folder), "n": 40}
    assert len(written_rows(tmp_path / "memit")) == 2
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "rome", "editor=rome", "editor.layers=[2]",
                                           "editor.mom2_adjustment=false", *no_text)))
    assert len(written_rows(tmp_path / "rome")) == 2
    for unread in ((f"model.stats.npz_dir={tmp_path / 'absent'}",), no_text[:1]):
        out = tmp_path / f"rome_without_c_{len(unread)}_{unread[0][12:19]}"
        run_experiment(composed(tiny_overrides(tiny_dir, out, "editor=rome", "editor.mom2_adjustment=false", *unread)))
        assert len(written_rows(out)) == 2
        assert json.loads((out / "environment.json").read_text())["stats_corpus"] is None
    with pytest.raises(FileNotFoundError, match=r"^ROME statistics file .*/model\.layers\.2\.mlp\.down_proj_float32_"
                                                r"mom2_40\.npz does not exist"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "rome_c", "editor=rome", "editor.layers=[2]",
                                               *no_text)))


@pytest.mark.parametrize("editor, layers", [("memit", "[1,2]"), ("rome", "[2]")])
def test_an_edited_layer_without_its_rome_file_fails_before_the_unedited_model_is_scored(editor, layers, tiny_dir,
                                                                                         tmp_path, monkeypatch):
    """A folder holding layer 1's file of the sample count but not layer 2's passed the folder check, scored the
    unedited model, then stopped when MEMIT first read layer 2's C; so does ROME's edit of layer 2 with the mom2
    adjustment (its default), which reads that layer's C."""
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "model.layers.1.mlp.down_proj_float32_mom2_40.npz",
             **{"mom2.mom2": np.eye(4), "mom2.count": np.array(1)})
    monkeypatch.setattr("sadr.runner.unedited_results",
                        lambda *args, **kwargs: pytest.fail("scored the unedited model"))
    with pytest.raises(FileNotFoundError, match=r"^ROME statistics file .*/model\.layers\.2\.mlp\.down_proj_float32_"
                                                r"mom2_40\.npz does not exist"):
        run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", f"editor={editor}",
                                               f"editor.layers={layers}", f"model.stats.npz_dir={folder}",
                                               "model.stats.n_samples=40")))
