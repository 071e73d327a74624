"""The three protocols through the real runner: what is edited together, what is evaluated on which weights,
and that single/batch restore the model bit for bit while sequential keeps stacking edits."""
from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch

import sadr.editors.delta as delta
from sadr.cache import TORCH, write_atomically
from sadr.editors.rome import RomeEditor
from sadr.errors import InvalidSettingError
from sadr.models.saving import EDITS_FILE
from sadr.results import DELTA_CHECKPOINT, RunDirectory
from sadr.runner import EDITED_MODEL, SEQUENTIAL_STATE, Experiment, run_experiment
from tests.runs import OFFLINE_RECORDS, composed, tiny_dir, tiny_overrides, written_rows  # noqa: F401 (tiny_dir is a fixture)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _changed(a: dict, b: dict) -> set[str]:
    return {name for name in a if not torch.equal(a[name], b[name])}


def _spied_experiment(cfg, monkeypatch):
    """An Experiment whose editor and evaluation record the model's weights each time they are called."""
    experiment = Experiment(cfg)
    calls = []
    original_apply, original_evaluate = RomeEditor.apply, Experiment._evaluate

    def apply(editor, requests):
        calls.append(("apply", [r.subject for r in requests], _state(experiment.loaded.model)))
        outcome = original_apply(editor, requests)
        calls.append(("applied", [r.subject for r in requests], _state(experiment.loaded.model)))
        return outcome

    def evaluate(self, cases):
        calls.append(("evaluate", [c.request.subject for c in cases], _state(self.loaded.model)))
        return original_evaluate(self, cases)

    monkeypatch.setattr(RomeEditor, "apply", apply)
    monkeypatch.setattr(Experiment, "_evaluate", evaluate)
    return experiment, calls


@pytest.mark.parametrize("protocol, batch_size", [("single", 1), ("batch", 2)])
def test_single_and_batch_evaluate_each_group_on_its_own_edit_and_restore_bitwise(protocol, batch_size, tiny_dir, tmp_path, monkeypatch):
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", f"editor.protocol={protocol}",
                                  f"editor.batch_size={batch_size}"))
    experiment, calls = _spied_experiment(cfg, monkeypatch)
    original = _state(experiment.loaded.model)
    out = experiment.run()

    assert [kind for kind, _, _ in calls] == ["apply", "applied", "evaluate"] * (2 // batch_size)
    for start in range(0, len(calls), 3):
        (_, group, before), (_, _, after), (_, evaluated, at_eval) = calls[start : start + 3]
        assert len(group) == batch_size and evaluated == group
        assert not _changed(before, original)  # every group starts from the unedited model
        assert _changed(after, original) == {"model.layers.1.mlp.down_proj.weight"}
        assert not _changed(at_eval, after)  # evaluated on exactly its own edit
    assert not _changed(_state(experiment.loaded.model), original)
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert {(r["protocol"], r["batch_size"]) for r in rows} == {(protocol, batch_size)}
    assert not (out / SEQUENTIAL_STATE).exists()


def test_sequential_stacks_every_edit_evaluates_once_at_the_end_and_checkpoints(tiny_dir, tmp_path, monkeypatch):
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor.protocol=sequential"))
    experiment, calls = _spied_experiment(cfg, monkeypatch)
    original = _state(experiment.loaded.model)
    out = experiment.run()

    assert [kind for kind, _, _ in calls] == ["apply", "applied", "apply", "applied", "evaluate"]
    (_, first, before_first), (_, _, after_first), (_, second, before_second), (_, _, after_second), (_, evaluated, at_eval) = calls
    assert not _changed(before_first, original)
    assert not _changed(before_second, after_first)  # the second edit lands on top of the first
    assert _changed(after_second, after_first) == {"model.layers.1.mlp.down_proj.weight"}
    assert evaluated == first + second and not _changed(at_eval, after_second)  # all cases see all edits
    checkpoint = torch.load(out / SEQUENTIAL_STATE)
    assert checkpoint["edited"] == ["0", "1"]
    assert torch.equal(checkpoint["editor"]["weights"][1], after_second["model.layers.1.mlp.down_proj.weight"])
    assert not _changed(_state(experiment.loaded.model), original)  # the process's model is handed back unedited
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == [0, 1]
    assert {r["diagnostics"]["n_edits_in_model"] for r in rows} == {2}


@pytest.mark.parametrize("protocol", ["batch", "sequential"])
def test_a_short_last_group_is_edited_and_recorded_as_its_own_size(protocol, tiny_dir, tmp_path, monkeypatch):
    """Three cases in batches of two: the groups are [0, 1] and [2], and the last case's row says it was edited
    alone, not in a batch of the configured size."""
    overrides = tiny_overrides(tiny_dir, tmp_path / "run", f"editor.protocol={protocol}", "editor.batch_size=2")
    cfg = composed([*(o for o in overrides if not o.startswith(("dataset.path=", "dataset.limit="))),
                    f"dataset.path={OFFLINE_RECORDS}", "dataset.limit=3"])
    experiment, calls = _spied_experiment(cfg, monkeypatch)
    out = experiment.run()
    subjects = [record["requested_rewrite"]["subject"] for record in json.loads(OFFLINE_RECORDS.read_text())[:3]]
    assert [group for kind, group, _ in calls if kind == "apply"] == [subjects[:2], subjects[2:]]
    assert [(r["case_id"], r["batch_size"]) for r in written_rows(out)] == [(0, 2), (1, 2), (2, 1)]


def test_a_resumed_sequential_run_keeps_the_size_of_each_batch_it_edited_before_the_stop(tiny_dir, tmp_path,
                                                                                          monkeypatch):
    """Three cases in batches of two, stopped after the first row: the resumed run edits nothing again, and the last
    case's row still says it was edited alone (the checkpoint keeps each case's batch size)."""
    overrides = tiny_overrides(tiny_dir, tmp_path / "run", "editor.protocol=sequential", "editor.batch_size=2")
    cfg = composed([*(o for o in overrides if not o.startswith(("dataset.path=", "dataset.limit="))),
                    f"dataset.path={OFFLINE_RECORDS}", "dataset.limit=3"])
    _run_killed_after_its_first_row(cfg, monkeypatch)
    applied = []
    monkeypatch.setattr(RomeEditor, "apply", lambda editor, requests: applied.append(requests))
    out = run_experiment(cfg)
    assert applied == []
    assert [(r["case_id"], r["batch_size"]) for r in written_rows(out)] == [(0, 2), (1, 2), (2, 1)]


def _run_killed_after_its_first_row(cfg, monkeypatch) -> None:
    """Runs `cfg` until it is about to write its second row, and kills it there."""
    original_append = RunDirectory.append

    def killed_after_the_first_row(run, row):
        if run.rows():
            raise KeyboardInterrupt
        original_append(run, row)

    monkeypatch.setattr(RunDirectory, "append", killed_after_the_first_row)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(RunDirectory, "append", original_append)


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_a_batch_run_killed_between_a_group_s_rows_edits_that_group_again_whole(tiny_dir, tmp_path, monkeypatch):
    """Batches of two, killed after the first row of [0, 1]: the rerun edits [0, 1] again (writing case 1's row
    only), from the δs the killed run kept for it (removed only once the group's rows are written), and then [2], the
    groups of an uninterrupted run, not [1, 2]; its rows are that run's."""
    def overrides(out):
        given = tiny_overrides(tiny_dir, out, "editor.protocol=batch", "editor.batch_size=2")
        return [*(o for o in given if not o.startswith(("dataset.path=", "dataset.limit="))),
                f"dataset.path={OFFLINE_RECORDS}", "dataset.limit=3"]

    whole = run_experiment(composed(overrides(tmp_path / "whole")))
    _run_killed_after_its_first_row(composed(overrides(tmp_path / "run")), monkeypatch)
    applied = []
    original_apply = RomeEditor.apply
    monkeypatch.setattr(RomeEditor, "apply", lambda editor, requests: (applied.append([r.subject for r in requests]),
                                                                       original_apply(editor, requests))[1])
    optimised, optimize_deltas = [], delta.optimize_deltas
    monkeypatch.setattr(delta, "optimize_deltas", lambda model, adapter, tokenizer, requests, *args, **kwargs: (
        optimised.extend(r.subject for r in requests), optimize_deltas(model, adapter, tokenizer, requests, *args,
                                                                       **kwargs))[1])
    out = run_experiment(composed(overrides(tmp_path / "run")))
    subjects = [record["requested_rewrite"]["subject"] for record in json.loads(OFFLINE_RECORDS.read_text())[:3]]
    assert applied == [subjects[:2], subjects[2:]] and optimised == subjects[2:]
    assert _without_seconds(written_rows(out)) == _without_seconds(written_rows(whole))


def test_a_sequential_run_killed_while_writing_its_rows_resumes_without_editing_again(tiny_dir, tmp_path, monkeypatch):
    """Both edits are checkpointed before any row: the resumed run evaluates the case left on both edits, its row
    and the saved model count both, and the rows are those of a run never interrupted."""
    whole = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "whole", "editor.protocol=sequential")))
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor.protocol=sequential", "save_edited=true"))
    _run_killed_after_its_first_row(cfg, monkeypatch)
    assert len(written_rows(tmp_path / "run")) == 1
    applied = []
    monkeypatch.setattr(RomeEditor, "apply", lambda editor, requests: applied.append(requests))
    out = run_experiment(cfg)
    assert applied == []
    assert _without_seconds(written_rows(out)) == _without_seconds(written_rows(whole))
    assert [r["diagnostics"]["n_edits_in_model"] for r in written_rows(out)] == [2, 2]
    note = json.loads((out / EDITED_MODEL / EDITS_FILE).read_text())
    assert note["n_edits"] == 2 and [edit["case_id"] for edit in note["edits"]] == [0, 1]


def test_seconds_timed_under_one_name_add_up_and_an_edit_s_row_keeps_them_without_its_updates(monkeypatch):
    """Two blocks timed as "keys" (2 s, then 3 s, the second raising) give 5 s; `without_updates` is what a row reads
    of an outcome: its seconds and diagnostics, not its updates (GBs for a large batch)."""
    from sadr.editors import base

    clock = iter([10.0, 12.0, 20.0, 23.0])
    monkeypatch.setattr(base.time, "perf_counter", lambda: next(clock))
    seconds = {"update": 1.0}
    with base.timed(seconds, "keys"):
        pass
    with pytest.raises(ValueError), base.timed(seconds, "keys"):
        raise ValueError
    assert seconds == {"update": 1.0, "keys": 5.0}
    outcome = base.EditOutcome(updates={1: object()}, seconds=seconds, diagnostics={"delta_steps": 4})
    row = outcome.without_updates()
    assert (row.updates, row.seconds, row.diagnostics) == ({}, seconds, {"delta_steps": 4})


def test_a_resumed_sequential_run_s_rows_add_the_edit_seconds_spent_before_the_kill(tiny_dir, tmp_path, monkeypatch,
                                                                                    caplog):
    """Killed during the second edit, resumed: each phase's seconds in the rows are the first edit's (kept by the
    checkpoint) plus the second's, not the second's alone; the log says the run resumed from its checkpoint. Each
    row holds its own edit's δ diagnostics, the first's kept by the checkpoint too."""
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor.protocol=sequential"))
    original, outcomes = RomeEditor.apply, []

    def apply(editor, requests):
        if len(outcomes) == 1:
            outcomes.append(None)
            raise KeyboardInterrupt
        outcomes.append(original(editor, requests))
        return outcomes[-1]

    monkeypatch.setattr(RomeEditor, "apply", apply)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    with caplog.at_level(logging.INFO, logger="sadr.runner"):
        out = run_experiment(cfg)
    assert re.search(r"sequential: resuming from .*sequential_state\.pt, which holds 1 edited request\(s\); 1 to edit",
                     caplog.text)
    first, _, second = outcomes
    assert sum(first.seconds.values()) > 0
    expected = {name: first.seconds.get(name, 0.0) + second.seconds.get(name, 0.0)
                for name in first.seconds.keys() | second.seconds.keys()}
    for row in written_rows(out):
        edit_seconds = {name: value for name, value in row["seconds"].items() if name != "eval_per_case"}
        assert edit_seconds == pytest.approx(expected)
    assert {"delta_steps", "delta_final_loss"} <= first.diagnostics.keys() and first.diagnostics != second.diagnostics
    assert [row["diagnostics"] for row in written_rows(out)] == [{**first.diagnostics, "n_edits_in_model": 2},
                                                                 {**second.diagnostics, "n_edits_in_model": 2}]


@pytest.mark.parametrize("protocol", ["single", "parallel", "sequential"])
def test_an_editor_whose_state_does_not_restore_the_model_is_stopped_with_the_fix(protocol, tiny_dir, tmp_path,
                                                                                   monkeypatch):
    """A plug-in's state_dict without copies: the cases after the first would be edited on top of it, silently.
    single and parallel stop after their first group, before its rows; sequential's rows, scored on the model edited
    in sequence as they should be, are kept."""
    monkeypatch.setattr(RomeEditor, "state_dict", lambda editor: {"weights": {
        layer: editor.adapter.down_weight(editor.model, layer) for layer in editor.layers}})
    chosen = {"single": ["editor.parallel_cases=1"], "parallel": ["editor.parallel_cases=2", "dataset.limit=4"],
              "sequential": ["editor.protocol=sequential"]}[protocol]
    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", *chosen)))
    with pytest.raises(RuntimeError, match=r"^editor=rome: loading the state it gave before the first edit did not "
                                           r"restore the model's weights; its state_dict must return copies"):
        experiment.run()
    rows = tmp_path / "run" / "cases.jsonl"
    assert len(written_rows(tmp_path / "run")) == 2 if protocol == "sequential" else not rows.exists()


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_a_run_stopped_while_it_evaluates_hands_the_model_back_unedited(protocol, tiny_dir, tmp_path, monkeypatch):
    """The process keeps its model for the next run of a sweep (sadr/models/kept.py), which reuses it only where it
    holds the weights that were loaded: a run stopped between an edit and its rows restores them too."""
    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", f"editor.protocol={protocol}")))
    original = _state(experiment.loaded.model)

    def stopped(self, cases):
        assert _changed(_state(self.loaded.model), original)  # on the edited model
        raise KeyboardInterrupt

    monkeypatch.setattr(Experiment, "_evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        experiment.run()
    assert not _changed(_state(experiment.loaded.model), original)


def _editor_without_regularizers(monkeypatch):
    """Editors built without the run's regularizers, as a plug-in that fine-tunes weights, ignoring them, would be."""
    from sadr.editors.plugin import EditorPlugin

    build = EditorPlugin.build
    monkeypatch.setattr(EditorPlugin, "build", lambda plugin, model, adapter, tokenizer, hparams, services: build(
        plugin, model, adapter, tokenizer, hparams, dataclasses.replace(services, regularizers=[])))


@pytest.mark.parametrize("protocol", ["single", "parallel", "sequential"])
def test_sadr_with_an_editor_that_does_not_run_the_delta_optimisation_is_refused(protocol, tiny_dir, tmp_path,
                                                                                  monkeypatch):
    """Its γ > 0 runs were the γ = 0 runs under SADR's name: refused after the first edit, before any row."""
    _editor_without_regularizers(monkeypatch)
    chosen = {"single": ["editor.parallel_cases=1"], "parallel": ["editor.parallel_cases=2"],
              "sequential": ["editor.protocol=sequential"]}[protocol]
    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "sadr.lambda=0.1", *chosen)))
    with pytest.raises(InvalidSettingError, match=r"^sadr\.lambda=0\.1 with editor=rome: its edit did not run sadr's "
                                                  r"δ-optimisation .* run this editor with sadr\.lambda=0$"):
        experiment.run()
    assert not (tmp_path / "run" / "cases.jsonl").exists()


def test_a_group_whose_deltas_a_stopped_run_kept_is_not_taken_for_one_without_sadr(tiny_dir, tmp_path, monkeypatch):
    """A group resumed from kept δs runs no δ-optimisation, so SADR's term is not attached there: the check waits for
    the next group edited afresh."""
    _editor_without_regularizers(monkeypatch)
    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "sadr.lambda=0.1")))
    # what a run stopped in its first group leaves: a chunk of δs (another group's here, so none is read back)
    write_atomically({"format": 2, "identity": {"group": ["another"]}, "first": 0, "results": []},
                     tmp_path / "run" / DELTA_CHECKPOINT / "000000.pt", TORCH)
    with pytest.raises(InvalidSettingError, match=r"its edit did not run sadr's δ-optimisation"):
        experiment.run()
    assert len(written_rows(tmp_path / "run")) == 1
