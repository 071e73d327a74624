"""AlphaEdit: the update lies in the null space of the preserved keys, solves its normal equations, and the
keys of earlier edits are carried (and checkpointed) across a sequential run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from sadr.editors.alphaedit import first_update, nullspace_projection, nullspace_update
from sadr.editors.plugin import EditorServices
from sadr.editors.registry import EDITORS
from sadr.models.adapters import adapter_for
from sadr.runner import SEQUENTIAL_STATE, run_experiment
from tests.editing import TEMPLATES, batch_requests, editor_config, statistics
from tests.runs import FIXTURES, composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)
from tests.tiny_models import make_model

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def edited(tokenizer, tmp_path_factory):
    """AlphaEdit on a tiny llama, two batches one after the other, with a threshold that keeps half of C's
    eigenvectors (the tiny model's C has no published scale) and a ridge small against its keys."""
    model = make_model("llama")
    stats = statistics(model, tokenizer, tmp_path_factory.mktemp("stats"))
    moments = stats.take(LAYERS)
    threshold = min(torch.linalg.eigvalsh(moments[layer]).median().item() for layer in LAYERS)
    hparams = editor_config("alphaedit", layers=LAYERS, context_templates=[[10, 3]], v_num_grad_steps=8,
                            nullspace_threshold=threshold, L2=1e-3)
    editor = EDITORS["alphaedit"].build(model, adapter_for(model), tokenizer, hparams, EditorServices(stats, TEMPLATES))
    requests = batch_requests(6)
    first, second = editor.apply(requests[:3]), editor.apply(requests[3:])
    return editor, moments, threshold, first, second


def test_each_layer_s_projection_is_made_once_and_its_c_released(tokenizer, tmp_path):
    """AlphaEdit solves with P only: C leaves the statistics' memory once P is made, and a later editor reads P from
    the disk cache, bit for bit."""
    model = make_model("llama")
    moments = statistics(model, tokenizer, tmp_path).take(LAYERS)  # computed once, then read from the disk cache
    threshold = min(torch.linalg.eigvalsh(moments[layer]).median().item() for layer in LAYERS)

    def alphaedit(stats):
        hparams = editor_config("alphaedit", layers=LAYERS, context_templates=[[10, 3]], nullspace_threshold=threshold)
        return EDITORS["alphaedit"].build(model, adapter_for(model), tokenizer, hparams, EditorServices(stats, TEMPLATES))

    stats = statistics(model, tokenizer, tmp_path)
    editor = alphaedit(stats)
    projections = editor.second_moments()
    assert sorted(projections) == LAYERS and not stats._memory
    assert all(editor.second_moments()[layer] is projections[layer] for layer in LAYERS)  # not made again
    for layer in LAYERS:
        assert 0 < torch.trace(projections[layer]) < projections[layer].shape[0] - 0.5  # a proper subspace
        torch.testing.assert_close(projections[layer], nullspace_projection(moments[layer], threshold), rtol=0, atol=0)
    again = alphaedit(statistics(model, tokenizer, tmp_path)).second_moments()
    assert all(torch.equal(again[layer], projections[layer]) for layer in LAYERS)


def test_the_projection_keeps_the_eigenvectors_below_the_threshold():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    values = np.array([5.0, 2.0, 0.5, 0.01, 0.001, 0.0001])
    c = torch.tensor(basis @ np.diag(values) @ basis.T)
    p = nullspace_projection(c, 0.02).numpy()
    expected = basis[:, 3:] @ basis[:, 3:].T
    np.testing.assert_allclose(p, expected, atol=1e-12)


def test_every_update_lies_in_the_null_space_and_leaves_preserved_keys_alone(edited):
    editor, moments, threshold, first, second = edited
    for outcome in (first, second):
        for solve in outcome.solves:
            update, p = solve.update.dense(), editor.second_moments()[solve.layer]
            assert update.norm() > 0
            torch.testing.assert_close(update @ p, update, rtol=0, atol=1e-10 * update.norm().item())
            values, vectors = torch.linalg.eigh(moments[solve.layer])
            preserved = vectors[:, values >= threshold]  # C's dominant directions: what the model already uses
            assert (update @ preserved).norm() <= 1e-9 * update.norm()


def test_updates_solve_their_normal_equations_with_the_earlier_keys(edited):
    """ΔW = Rᵀ K P ((KᵀK + Cₚ) P + L2 I)⁻¹ (the paper's right-multiplied form), solved here in numpy, with Cₚ the
    first batch's KᵀK for the second batch."""
    editor, moments, _, first, second = edited
    earlier = {solve.layer: np.zeros((solve.keys.shape[1],) * 2) for solve in first.solves}
    for outcome in (first, second):
        for solve in outcome.solves:
            k, r = solve.keys.double().numpy(), solve.residuals.double().numpy()
            p = editor.second_moments()[solve.layer].numpy()
            system = (k.T @ k + earlier[solve.layer]) @ p + editor.hparams.L2 * np.eye(k.shape[1])
            expected = np.linalg.solve(system.T, (r.T @ k @ p).T).T
            np.testing.assert_allclose(solve.update.dense().numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
            earlier[solve.layer] = earlier[solve.layer] + k.T @ k
    for layer, accumulated in earlier.items():
        np.testing.assert_allclose(editor.earlier_keys[layer].numpy(), accumulated, rtol=1e-12)


def test_requests_solved_alone_each_see_the_preserved_keys_and_not_each_others(edited):
    """`solve_each` after two batches (the sequential protocol with parallel cases): each row's update solves its own
    normal equations with Cₚ the keys preserved so far, and the preserved keys are left as they were."""
    editor, _, _, _, second = edited
    solve = second.solves[0]
    preserved = editor.earlier_keys[solve.layer].clone()
    state = editor.state_dict()
    try:
        updates = editor.solve_each(solve.layer, solve.keys, solve.residuals, editor.second_moments()[solve.layer])
        assert torch.equal(editor.earlier_keys[solve.layer], preserved)
    finally:
        editor.load_state_dict(state)
    p = editor.second_moments()[solve.layer].numpy()
    assert len(updates) == len(solve.keys) > 1
    for row, update in enumerate(updates):
        k, r = solve.keys[row : row + 1].double().numpy(), solve.residuals[row : row + 1].double().numpy()
        system = (k.T @ k + preserved.numpy()) @ p + editor.hparams.L2 * np.eye(k.shape[1])
        expected = np.linalg.solve(system.T, (r.T @ k @ p).T).T
        np.testing.assert_allclose(update.dense().numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_requests_solved_alone_before_any_edit_solve_without_preserved_keys_and_leave_none(tokenizer, tmp_path):
    """`solve_each` on an editor that has edited nothing (the single protocol with parallel cases): each row's update
    solves its normal equations with Cₚ = 0, and no preserved keys are left behind for the next group."""
    model = make_model("llama")
    hparams = editor_config("alphaedit", layers=LAYERS, context_templates=[[10, 3]], nullspace_threshold=1e9, L2=1e-3)
    editor = EDITORS["alphaedit"].build(model, adapter_for(model), tokenizer, hparams,
                                        EditorServices(statistics(model, tokenizer, tmp_path), TEMPLATES))
    p = editor.second_moments()[1]
    torch.manual_seed(0)
    keys, residuals = torch.randn(3, p.shape[0]), torch.randn(3, 5)
    updates = editor.solve_each(1, keys, residuals, p)
    assert editor.earlier_keys == {} and editor.state_dict()["earlier_keys"] == {}
    for row, update in enumerate(updates):
        k, r = keys[row : row + 1].double().numpy(), residuals[row : row + 1].double().numpy()
        system = k.T @ k @ p.numpy() + hparams.L2 * np.eye(k.shape[1])
        expected = np.linalg.solve(system.T, (r.T @ k @ p.numpy()).T).T
        np.testing.assert_allclose(update.dense().numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_a_first_request_s_closed_form_update_is_the_solve_s():
    """Before any edit the system is L2 I + (P k) kᵀ: Sherman–Morrison gives the solve's update to float64 rounding."""
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    projection = basis[:, :7] @ basis[:, :7].T
    key, residual = torch.randn(1, 12), torch.randn(1, 5)
    for l2 in (1e-3, 10.0):
        solved = nullspace_update(key, residual, projection, None, l2).dense()
        torch.testing.assert_close(first_update(key, residual, projection, l2).dense(), solved, rtol=1e-10, atol=1e-12)
        zeros = nullspace_update(key, residual, projection, torch.zeros(12, 12, dtype=torch.float64), l2).dense()
        torch.testing.assert_close(zeros, solved, rtol=1e-12, atol=1e-14)


def test_a_killed_sequential_run_resumes_with_the_accumulated_keys(tiny_dir, tmp_path, monkeypatch):
    """Four batches of one edit; killed after the second, resumed: the final state (weights and accumulated
    keys) and every row equal those of the run that was never interrupted."""
    overrides = ["editor=alphaedit", "editor.protocol=sequential", "editor.nullspace_threshold=1e9", "editor.L2=1e-3",
                 "dataset=sadr_merged", f"dataset.path={FIXTURES / 'sadr_merged.json'}", "dataset.limit=4"]
    whole = run_experiment(composed([*tiny_overrides(tiny_dir, tmp_path / "whole"), *overrides]))
    editor_class = EDITORS["alphaedit"].editor
    original, calls = editor_class.apply, []

    def killed_at_the_third(self, requests):
        calls.append(requests)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, requests)

    cfg = composed([*tiny_overrides(tiny_dir, tmp_path / "resumed"), *overrides])
    monkeypatch.setattr(editor_class, "apply", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    interrupted = torch.load(tmp_path / "resumed" / SEQUENTIAL_STATE)
    assert len(interrupted["edited"]) == 2 and all(m.norm() > 0 for m in interrupted["editor"]["earlier_keys"].values())
    monkeypatch.setattr(editor_class, "apply", original)
    resumed = run_experiment(cfg)

    a, b = torch.load(whole / SEQUENTIAL_STATE), torch.load(resumed / SEQUENTIAL_STATE)
    assert a["edited"] == b["edited"] and len(a["edited"]) == 4
    for part in ("weights", "earlier_keys"):
        for layer in a["editor"][part]:
            assert torch.equal(a["editor"][part][layer], b["editor"][part][layer]), (part, layer)
    rows = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "diagnostics")}  # noqa: E731
                        for line in (run / "cases.jsonl").read_text().splitlines()]
    assert rows(whole) == rows(resumed)
    # the rows' edit times include those of the edits made before the kill, which the checkpoint kept
    seconds = json.loads((resumed / "cases.jsonl").read_text().splitlines()[0])["seconds"]
    assert interrupted["seconds"]["delta"] > 0 and seconds["delta"] > interrupted["seconds"]["delta"]
    assert b["seconds"] == {name: value for name, value in seconds.items() if name != "eval_per_case"}


def test_published_settings_compose_and_keys_alphaedit_never_reads_do_not_exist():
    gptj = composed(["editor=alphaedit", "model=gpt-j"]).editor
    assert list(gptj.layers) == [3, 4, 5, 6, 7, 8] and (gptj.nullspace_threshold, gptj.L2) == (0.02, 10.0)
    assert "AlphaEdit repo" in gptj.source and gptj.v_num_grad_steps == 25 and gptj.clamp_norm_factor == 0.75
    llama = composed(["editor=alphaedit", "model=llama3-8b"]).editor
    assert list(llama.layers) == [4, 5, 6, 7, 8] and llama.v_lr == 0.1 and llama.v_loss_layer == 31
    for unread in ("mom2_update_weight=15000", "mom2_adjustment=true"):
        with pytest.raises(ConfigCompositionException):
            composed(["editor=alphaedit", f"editor.{unread}"])


def test_sadr_regularizes_alphaedit_through_the_shared_delta_optimisation(tiny_dir, tmp_path):
    out = run_experiment(composed([*tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1"), "editor=alphaedit",
                                   "editor.L2=1e-3", "sadr.lambda=0.5", "sadr.heads=all"]))
    row = json.loads((out / "cases.jsonl").read_text().splitlines()[0])
    assert row["editor"] == "alphaedit" and row["sadr_lambda"] == 0.5
    assert row["diagnostics"]["selected_heads"] > 0 and row["diagnostics"]["loss"] > 0


def test_an_eigenvalue_equal_to_the_threshold_is_not_in_the_null_space():
    """The reference keeps the singular directions with S < nullspace_threshold, strictly: on a diagonal C (whose
    eigenvalues eigh returns exactly), the eigenvalue equal to the threshold is left out."""
    c = torch.diag(torch.tensor([0.5, 0.25, 2.0, 1.0], dtype=torch.float64))
    p = nullspace_projection(c, 0.5)
    torch.testing.assert_close(p, torch.diag(torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)), rtol=0, atol=1e-15)
    torch.testing.assert_close(nullspace_projection(c, 0.5000001), torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0],
                               dtype=torch.float64)), rtol=0, atol=1e-15)


def test_another_threshold_does_not_read_the_projection_cached_for_the_first(tokenizer, tmp_path):
    """The projection's disk cache is keyed by the threshold too: a second editor with another threshold on the same
    statistics gets the projection of its own threshold."""
    model = make_model("llama")
    moments = statistics(model, tokenizer, tmp_path).take(LAYERS)
    values = torch.linalg.eigvalsh(moments[1])
    thresholds = [values[len(values) // 4].item() * 1.001, values[3 * len(values) // 4].item() * 1.001]
    for threshold in thresholds:
        hparams = editor_config("alphaedit", layers=LAYERS, context_templates=[[10, 3]], nullspace_threshold=threshold)
        editor = EDITORS["alphaedit"].build(model, adapter_for(model), tokenizer, hparams,
                                            EditorServices(statistics(model, tokenizer, tmp_path), TEMPLATES))
        projection = editor.second_moments()[1]
        torch.testing.assert_close(projection, nullspace_projection(moments[1], threshold), rtol=0, atol=1e-12)


def test_restoring_the_unedited_state_forgets_the_keys_preserved_by_the_edit_undone(tokenizer, tmp_path):
    """The single and batch protocols restore the editor's state after every group: the next group is edited into the
    unedited model, so it must not see the undone group's keys as preserved ones (nor its weights)."""
    model = make_model("llama")
    stats = statistics(model, tokenizer, tmp_path)
    moments = stats.take(LAYERS)
    threshold = min(torch.linalg.eigvalsh(moments[layer]).median().item() for layer in LAYERS)
    hparams = editor_config("alphaedit", layers=LAYERS, context_templates=[[10, 3]], v_num_grad_steps=2,
                            nullspace_threshold=threshold, L2=1e-3)
    editor = EDITORS["alphaedit"].build(model, adapter_for(model), tokenizer, hparams, EditorServices(stats, TEMPLATES))
    before = {layer: editor.adapter.down_weight(model, layer).detach().clone() for layer in LAYERS}
    unedited = editor.state_dict()
    editor.apply(batch_requests(1))
    assert set(editor.earlier_keys) == set(LAYERS)
    editor.load_state_dict(unedited)
    assert editor.earlier_keys == {}
    for layer in LAYERS:
        assert torch.equal(editor.adapter.down_weight(model, layer), before[layer])
