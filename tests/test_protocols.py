"""The three protocols through the real runner: what is edited together, what is evaluated on which weights,
and that single/batch restore the model bit for bit while sequential keeps stacking edits."""
from __future__ import annotations

import json

import pytest
import torch

from sadr.editors.rome import RomeEditor
from sadr.runner import SEQUENTIAL_STATE, Experiment
from tests.runs import composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)


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
