"""editor.parallel_cases: single edits side by side give what one at a time gives.

Each case is compared with the same case edited alone (`apply([request])`, evaluated on the written weights,
restored): the same δ steps, δs equal to float tolerance, the same per-prompt decisions. Separately, the per-row
rank-one evaluation is compared with evaluating each case's update written into the weights. Through the runner: the
rows of a parallel run against those of a one-at-a-time run, resuming a killed run, and the settings it refuses.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sadr.editors.rome as rome_module
import sadr.editors.spread as spread_module
from sadr.conf.validation import ConfigError
from sadr.data.records import EditCase, EditRequest, LabeledPrompt
from sadr.editors.low_rank import PerRowUpdates
from sadr.editors.plugin import EditorServices
from sadr.editors.registry import EDITORS
from sadr.editors.rome import RomeEditor
from sadr.editors.update import LowRankUpdate
from sadr.evaluation.drift import ATTENTION, decode_entry
from sadr.evaluation.generation_metrics import GenerationMetrics
from sadr.evaluation.probes import METRICS, resolve_metrics
from sadr.evaluation.suite import PromptMetrics, evaluate_all
from sadr.models.adapters import adapter_for
from sadr.regularizers.attention_drift import SelectiveAttentionDriftRegularizer
from sadr.runner import GPU_PARALLEL_CASES, Experiment, parallel_cases
from tests.editing import BATCH_SUBJECTS, BATCH_TARGETS, TEMPLATES, editor_config, spread_config, statistics
from tests.runs import OFFLINE_RECORDS, composed, tiny_dir, tiny_overrides, written_rows  # noqa: F401 (tiny_dir is a fixture)
from tests.tiny_models import FAMILIES, make_model

N_CASES = 4
DELTA_RTOL = 1e-5  # float32: the wider batch only changes the order of float sums
# Two probabilities closer than this (relative) are a tie that float noise may break either way.
TIE_RTOL = 1e-5


def tiny_cases(n: int = N_CASES) -> list[EditCase]:
    cases = []
    for i, (subject, new) in enumerate(zip(BATCH_SUBJECTS[:n], BATCH_TARGETS[:n])):
        request = EditRequest(prompt="The capital city of {}", subject=subject, target_new=new,
                              target_true=BATCH_TARGETS[(i + 5) % len(BATCH_TARGETS)])
        cases.append(EditCase(
            i, request,
            paraphrase_prompts=(f"Because I said. The capital city of {subject}",),
            neighborhood_prompts=("The capital city of Japan", f"The city of {BATCH_SUBJECTS[9 - i]} is in"),
            relation_prompts=(LabeledPrompt(f"{subject} is based in", "Japan"),),
            generation_prompts=(f"{subject} is", f"The city of {subject}"),
        ))
    return cases


def build_editor(name: str, model, tokenizer, cache_dir, sadr: bool, **overrides):
    settings = {"v_num_grad_steps": 10, **overrides}
    if name == "rome":
        hparams = editor_config(name, **settings)
    elif name == "alphaedit":  # a large threshold keeps the whole space, so the edits act on tiny keys
        hparams = editor_config(name, layers=[1, 2], context_templates=[[10, 3]], clamp_norm_factor=4.0,
                                nullspace_threshold=1e9, L2=1e-3, **settings)
    else:
        hparams = spread_config(name, clamp_norm_factor=4.0, **settings)
    regularizers = [SelectiveAttentionDriftRegularizer(10.0)] if sadr else []
    services = EditorServices(statistics(model, tokenizer, cache_dir), TEMPLATES, regularizers)
    return EDITORS[name].build(model, adapter_for(model), tokenizer, hparams, services)


EVALUATORS = [PromptMetrics(resolve_metrics(list(METRICS)), drift=True)]


def record(monkeypatch, name: str) -> list:
    """Every DeltaResult the editor's module computes, alone or together, in order."""
    module = rome_module if name == "rome" else spread_module
    results = []
    for function in ("optimize_delta", "optimize_deltas"):
        original = getattr(module, function)

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            results.extend(out if isinstance(out, list) else [out])
            return out

        monkeypatch.setattr(module, function, recording)
    return results


def one_at_a_time(editor, cases):
    """The single protocol with parallel_cases=1: edit, evaluate on the written weights, restore."""
    state, results = editor.state_dict(), []
    for case in cases:
        editor.apply([case.request])
        results += evaluate_all(EVALUATORS, editor.model, editor.tokenizer, editor.adapter, [case])
        editor.load_state_dict(state)
    return results


def side_by_side(editor, cases):
    outcomes = editor.apply_each([case.request for case in cases])
    with PerRowUpdates(editor.model, editor.adapter, [o.updates for o in outcomes]) as updates:
        return outcomes, evaluate_all(EVALUATORS, editor.model, editor.tokenizer, editor.adapter, cases, updates.rows)


def both_ways(editor, name: str, monkeypatch):
    """The tiny cases edited one at a time and side by side: (δ results alone, δ results side by side, the
    side-by-side outcomes, results alone, results side by side), after checking that the edits change efficacy."""
    cases = tiny_cases()
    unedited = evaluate_all(EVALUATORS, editor.model, editor.tokenizer, editor.adapter, cases)
    deltas = record(monkeypatch, name)
    alone = one_at_a_time(editor, cases)
    assert [r["efficacy"]["value"] for r in alone] != [r["efficacy"]["value"] for r in unedited]  # the edits do something
    outcomes, together = side_by_side(editor, cases)
    return deltas[:N_CASES], deltas[N_CASES:], outcomes, alone, together


def assert_same_decisions(expected: list[dict], got: list[dict], prob_rtol: float) -> None:
    """Every prompt's decision is the same unless its two probabilities tie; probabilities and attention agree."""
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        for name, entry in want.items():
            if name == ATTENTION:
                torch.testing.assert_close(torch.from_numpy(decode_entry(have[name])),
                                           torch.from_numpy(decode_entry(entry)), rtol=0, atol=1e-3)
                continue
            if "p_good" not in entry:  # attention drift, derived from the attention rows
                torch.testing.assert_close(have[name]["value"], entry["value"], rtol=0, atol=2e-3)
                continue
            torch.testing.assert_close(have[name]["p_good"], entry["p_good"], rtol=prob_rtol, atol=1e-9)
            for i, (good, bad) in enumerate(zip(entry["p_good"], entry.get("p_bad", []))):
                tie = abs(good - bad) <= TIE_RTOL * max(good, bad)
                assert tie or have[name]["value"][i] == entry["value"][i], (name, i, good, bad)


SETTINGS = [("rome", family, family in ("gpt2", "llama", "qwen2")) for family in FAMILIES] + [
    ("memit", "gpt2", True), ("memit", "gpt_neox", False), ("pmet", "llama", True), ("pmet", "gptj", False),
    ("alphaedit", "qwen2", False),
]
# PMET's stop rule (the new object is the argmax and the KL small) ends these requests at different steps, so a
# stopped request's δ must stay frozen while the others go on
PMET_STAGGERED = {"v_lr": 0.005}


@pytest.mark.parametrize("name, family, sadr", SETTINGS, ids=[f"{n}-{f}{'-sadr' if s else ''}" for n, f, s in SETTINGS])
def test_parallel_cases_give_the_steps_deltas_and_decisions_of_one_at_a_time(name, family, sadr, tokenizer, tmp_path,
                                                                            monkeypatch):
    editor = build_editor(name, make_model(family), tokenizer, tmp_path, sadr, **(PMET_STAGGERED if name == "pmet" else {}))
    single, parallel, outcomes, alone, together = both_ways(editor, name, monkeypatch)

    assert [d.steps_run for d in parallel] == [d.steps_run for d in single]
    if name == "pmet":
        assert len({d.steps_run for d in single}) > 1
    for a, b in zip(single, parallel):
        for site in a.deltas:
            assert a.deltas[site].norm() > 0
            torch.testing.assert_close(b.deltas[site], a.deltas[site], rtol=DELTA_RTOL, atol=DELTA_RTOL * a.deltas[site].norm())
    if sadr:
        assert any(d.diagnostics["selected_heads"] > 0 for d in single)  # SADR acts, so its per-case terms are compared
        for a, b in zip(single, parallel):
            assert b.diagnostics["selected_head_counts"] == a.diagnostics["selected_head_counts"]
            assert b.diagnostics["loss"] == pytest.approx(a.diagnostics["loss"], rel=1e-3, abs=1e-7)
    assert [o.diagnostics["delta_steps"] for o in outcomes] == [d.steps_run for d in single]
    assert_same_decisions(alone, together, prob_rtol=1e-3)


def test_a_stopped_request_leaves_the_batch(tokenizer, tmp_path, monkeypatch):
    """PMET's staggered stops, with SADR: after each step at which a request stops, the next forwards are fed only the
    rows of those that go on, and their δs, steps and SADR terms stay those of each request optimised alone."""
    editor = build_editor("pmet", make_model("llama"), tokenizer, tmp_path, sadr=True, v_lr=0.003)  # stops at 5, 6 and 7 steps
    fed, results = [], []
    original = spread_module.optimize_deltas

    def watched(model, *args, **kwargs):
        hook = model.base_model.register_forward_pre_hook(
            lambda _module, _args, inputs: fed.append(inputs["input_ids"].shape[0]), with_kwargs=True)
        try:
            results.extend(original(model, *args, **kwargs))
        finally:
            hook.remove()
        return results

    monkeypatch.setattr(spread_module, "optimize_deltas", watched)
    requests = [case.request for case in tiny_cases()]
    for request in requests:
        editor.apply_each([request])
    alone = list(results)
    fed.clear()
    results.clear()
    editor.apply_each(requests)
    steps = [r.steps_run for r in results]
    assert len(set(steps)) > 2, steps  # stops at three or more different steps
    rows_per_request = fed[0] // N_CASES  # the prefix forward, every request's rows
    assert fed[1:] == [rows_per_request * sum(n > step for n in steps) for step in range(max(steps))]
    assert steps == [r.steps_run for r in alone]
    for a, b in zip(alone, results):
        for site in a.deltas:
            torch.testing.assert_close(b.deltas[site], a.deltas[site], rtol=DELTA_RTOL, atol=DELTA_RTOL * a.deltas[site].norm())
        assert b.diagnostics["selected_head_counts"] == a.diagnostics["selected_head_counts"]
        assert b.diagnostics["loss"] == pytest.approx(a.diagnostics["loss"], rel=1e-3, abs=1e-7)
    assert any(r.diagnostics["selected_heads"] > 0 for r in alone)


@pytest.mark.parametrize("name, family", [("rome", family) for family in FAMILIES] + [("memit", "llama")])
def test_per_row_updates_evaluate_as_the_written_weights(name, family, tokenizer, tmp_path):
    model = make_model(family)
    editor = build_editor(name, model, tokenizer, tmp_path, sadr=False, v_num_grad_steps=4)
    cases = tiny_cases()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    outcomes, together = side_by_side(editor, cases)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())  # nothing written

    state, written = editor.state_dict(), []
    for case, outcome in zip(cases, outcomes):
        for layer, update in outcome.updates.items():
            editor.adapter.add_to_down_weight(model, layer, update)
        written += evaluate_all(EVALUATORS, model, editor.tokenizer, editor.adapter, [case])
        editor.load_state_dict(state)
    assert_same_decisions(written, together, prob_rtol=1e-4)


@pytest.mark.parametrize("style", ["reference", "fixed"])
def test_texts_sampled_through_per_row_updates_are_those_of_the_written_weights(tokenizer, tmp_path, style):
    model = make_model("llama")
    editor = build_editor("rome", model, tokenizer, tmp_path, sadr=False, v_num_grad_steps=4)
    cases = tiny_cases(2)
    generation = [GenerationMetrics(seed=0, length=20, style=style)]
    outcomes = editor.apply_each([case.request for case in cases])
    with PerRowUpdates(model, editor.adapter, [o.updates for o in outcomes]) as updates:
        together = evaluate_all(generation, model, tokenizer, editor.adapter, cases, updates.rows)
    state, written = editor.state_dict(), []
    for case, outcome in zip(cases, outcomes):
        editor.adapter.add_to_down_weight(model, 1, outcome.updates[1])
        written += evaluate_all(generation, model, tokenizer, editor.adapter, [case])
        editor.load_state_dict(state)
    unedited = evaluate_all(generation, model, tokenizer, editor.adapter, cases)
    assert [r["fluency"]["text"] for r in together] == [r["fluency"]["text"] for r in written]
    assert [r["fluency"]["text"] for r in together] != [r["fluency"]["text"] for r in unedited]


def test_per_row_updates_of_any_rank_give_each_row_its_written_model(tokenizer):
    """Cases of rank 2, rank 1 on another layer, and no update, in one batch: each row's logits are those of the model
    with that case's dense ΔW written (a sum of two rank-one updates is the sum of the written changes)."""
    model = make_model("llama")
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)

    def random_update(layer: int, rank: int) -> LowRankUpdate:
        out_features, in_features = adapter.down_weight(model, layer).shape
        return LowRankUpdate(torch.randn(out_features, rank, generator=g, dtype=torch.float64),
                             torch.randn(in_features, rank, generator=g, dtype=torch.float64) / in_features)

    first, second = random_update(1, 1), random_update(1, 1)
    cases = [{1: first + second}, {2: random_update(2, 1)}, {}]
    assert cases[0][1].rank == 2
    torch.testing.assert_close(cases[0][1].dense(), first.dense() + second.dense())
    ids = torch.tensor([tokenizer("The capital city of France is")["input_ids"]] * len(cases))
    with torch.no_grad(), PerRowUpdates(model, adapter, cases) as updates, updates.rows(list(range(len(cases)))):
        together = model(input_ids=ids).logits
    for row, case in enumerate(cases):
        fresh = make_model("llama")
        for layer, update in case.items():
            adapter.add_to_down_weight(fresh, layer, update)
        with torch.no_grad():
            alone = fresh(input_ids=ids[row : row + 1]).logits[0]
        torch.testing.assert_close(together[row], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[0], together[2], atol=1e-3)


def test_a_forward_without_row_cases_is_an_error(tokenizer):
    model = make_model("llama")
    adapter = adapter_for(model)
    out_features, in_features = adapter.down_weight(model, 1).shape
    update = LowRankUpdate(torch.ones(out_features, 1), torch.ones(in_features, 1))
    ids = torch.tensor([tokenizer("The capital city of France")["input_ids"]])
    with PerRowUpdates(model, adapter, [{1: update}]) as updates:
        with pytest.raises(RuntimeError, match="which case each row"):
            model(input_ids=ids)
        with pytest.raises(RuntimeError, match="row cases for a batch"):
            with updates.rows([0, 0]):
                model(input_ids=ids)


def test_cases_of_different_ranks_on_one_layer_give_each_row_its_written_model(tokenizer):
    """Two cases editing the same layer with updates of rank 1 and rank 3 (a ROME batch's sum): the layer's factors
    are padded to the highest rank, and each row's logits are those of the model with its own dense ΔW written."""
    model = make_model("llama")
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(1)
    out_features, in_features = adapter.down_weight(model, 1).shape

    def random_update(rank: int) -> LowRankUpdate:
        return LowRankUpdate(torch.randn(out_features, rank, generator=g, dtype=torch.float64),
                             torch.randn(in_features, rank, generator=g, dtype=torch.float64) / in_features)

    cases = [{1: random_update(1)}, {1: random_update(3)}]
    ids = torch.tensor([tokenizer("The capital city of France is")["input_ids"]] * len(cases))
    with torch.no_grad(), PerRowUpdates(model, adapter, cases) as updates, updates.rows([1, 0]):
        together = model(input_ids=ids).logits
    for row, case in zip(range(2), (cases[1], cases[0])):
        fresh = make_model("llama")
        adapter.add_to_down_weight(fresh, 1, case[1])
        with torch.no_grad():
            alone = fresh(input_ids=ids[row : row + 1]).logits[0]
        torch.testing.assert_close(together[row], alone, rtol=1e-4, atol=1e-4)


def test_row_cases_outside_the_updates_or_after_their_block_are_errors(tokenizer):
    """A negative index would silently pick the last case, and one past the end would fail deep inside a forward;
    once `rows` is left, the next forward is again an error rather than reusing the last block's cases."""
    model = make_model("llama")
    adapter = adapter_for(model)
    out_features, in_features = adapter.down_weight(model, 1).shape
    update = LowRankUpdate(torch.ones(out_features, 1), torch.ones(in_features, 1))
    ids = torch.tensor([tokenizer("The capital city of France")["input_ids"]])
    with PerRowUpdates(model, adapter, [{1: update}, {}]) as updates:
        for outside in ([-1], -1, [2], 2, [0, 2], []):
            with pytest.raises(ValueError, match="outside 0..1"):
                with updates.rows(outside):
                    pass
        with torch.no_grad(), updates.rows([1]):
            model(input_ids=ids)
        with pytest.raises(RuntimeError, match="which case each row"):
            model(input_ids=ids)


def run_config(tiny_dir, out, *extra):
    """The tiny llama run of tests/runs.py on the first four offline records."""
    overrides = [o for o in tiny_overrides(tiny_dir, out) if not o.startswith(("dataset.path=", "dataset.limit="))]
    return composed([*overrides, f"dataset.path={OFFLINE_RECORDS}", "dataset.limit=4", *extra])


def test_a_parallel_run_writes_the_rows_of_a_one_at_a_time_run(tiny_dir, tmp_path):
    edit = ("editor.v_lr=0.5", "editor.v_num_grad_steps=10", "sadr.lambda=1.0")  # edits that change decisions
    alone = written_rows(Experiment(run_config(tiny_dir, tmp_path / "alone", *edit)).run())
    together = written_rows(Experiment(run_config(tiny_dir, tmp_path / "together", *edit, "editor.parallel_cases=3")).run())
    assert any(r["edited"]["neighborhood"]["value"] != r["unedited"]["neighborhood"]["value"] for r in alone)
    assert [r["case_id"] for r in together] == [r["case_id"] for r in alone] == [0, 1, 2, 3]
    for a, b in zip(alone, together):
        assert (b["protocol"], b["batch_size"]) == (a["protocol"], a["batch_size"]) == ("single", 1)
        assert b["diagnostics"]["delta_steps"] == a["diagnostics"]["delta_steps"]
        assert b["diagnostics"]["selected_head_counts"] == a["diagnostics"]["selected_head_counts"]
        assert b["seconds"].keys() == a["seconds"].keys()
        assert b["unedited"] == a["unedited"]
    assert_same_decisions([r["edited"] for r in alone], [r["edited"] for r in together], prob_rtol=1e-3)


def test_a_killed_parallel_run_resumes_with_its_unfinished_cases_only(tiny_dir, tmp_path, monkeypatch):
    cfg = run_config(tiny_dir, tmp_path / "run", "editor.parallel_cases=2")
    original, edited = RomeEditor.apply_each, []

    def apply_each(editor, requests):
        edited.append([r.subject for r in requests])
        if len(edited) == 2:
            raise KeyboardInterrupt  # killed while editing the second group
        return original(editor, requests)

    monkeypatch.setattr(RomeEditor, "apply_each", apply_each)
    with pytest.raises(KeyboardInterrupt):
        Experiment(cfg).run()
    first = written_rows(Path(cfg.output_dir))
    assert [r["case_id"] for r in first] == [0, 1]  # the first group's rows, one per case

    edited.clear()
    monkeypatch.setattr(RomeEditor, "apply_each", lambda editor, requests: edited.append(requests) or original(editor, requests))
    out = Experiment(cfg).run()
    assert [[r.subject for r in group] for group in edited] == [[r["subject"] for r in written_rows(out)[2:]]]
    assert [r["case_id"] for r in written_rows(out)] == [0, 1, 2, 3] and written_rows(out)[:2] == first


def test_a_group_that_runs_out_of_gpu_memory_is_redone_in_halves(tiny_dir, tmp_path, monkeypatch):
    """The run goes on at the width that fit, and its rows are those of a run at that width from the start."""
    at_two = written_rows(Experiment(run_config(tiny_dir, tmp_path / "two", "editor.parallel_cases=2")).run())
    original, tried = RomeEditor.apply_each, []

    def apply_each(editor, requests):
        tried.append(len(requests))
        if len(requests) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(editor, requests)

    monkeypatch.setattr(RomeEditor, "apply_each", apply_each)
    out = Experiment(run_config(tiny_dir, tmp_path / "four", "editor.parallel_cases=4")).run()
    assert tried == [4, 2, 2]
    assert [(r["case_id"], r["edited"], r["diagnostics"]) for r in written_rows(out)] == \
        [(r["case_id"], r["edited"], r["diagnostics"]) for r in at_two]


def test_a_first_group_redone_one_case_at_a_time_is_still_checked_for_a_restored_model(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    """Two cases side by side run out of GPU memory, so the first group is case 0 alone: an editor whose state does
    not restore the model is stopped there, before its row, as where the first group fit."""
    monkeypatch.setattr(RomeEditor, "state_dict", lambda editor: {"weights": {
        layer: editor.adapter.down_weight(editor.model, layer) for layer in editor.layers}})
    original = RomeEditor.apply_each

    def apply_each(editor, requests):
        if len(requests) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(editor, requests)

    monkeypatch.setattr(RomeEditor, "apply_each", apply_each)
    with pytest.raises(RuntimeError, match=r"^editor=rome: loading the state it gave before the first edit did not"):
        Experiment(run_config(tiny_dir, tmp_path / "run", "editor.parallel_cases=2")).run()
    assert not (tmp_path / "run" / "cases.jsonl").exists()


def test_a_statistics_pass_out_of_gpu_memory_is_not_retried_with_fewer_cases(tiny_dir, tmp_path, monkeypatch):
    """Its size does not depend on the cases side by side: the run stops at once, naming the setting that bounds it."""
    import sadr.editors.covariance as covariance_module
    from sadr.errors import DeviceMemoryError

    passes = []

    def out_of_memory(*args, **kwargs):
        passes.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(covariance_module, "accumulate_second_moments", out_of_memory)
    with pytest.raises(DeviceMemoryError, match="model.stats.batch_tokens"):
        Experiment(run_config(tiny_dir, tmp_path / "run", "editor.parallel_cases=4", "cache_dir=" + str(tmp_path))).run()
    assert passes == [1]


def test_one_case_that_runs_out_of_gpu_memory_is_an_error_naming_the_settings_that_fit_it(tiny_dir, tmp_path,
                                                                                          monkeypatch):
    from sadr.errors import DeviceMemoryError

    tried = []

    def apply_each(editor, requests):
        tried.append(len(requests))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.50 GiB\nmore detail")

    monkeypatch.setattr(RomeEditor, "apply_each", apply_each)
    with pytest.raises(DeviceMemoryError, match=r"editing ran out of GPU memory \(CUDA out of memory. Tried to allocate "
                                                r"4.50 GiB\)\. model\.stats\.factor_device=cpu .* a run resumes with it"):
        Experiment(run_config(tiny_dir, tmp_path / "run", "editor.parallel_cases=4")).run()
    assert tried == [4, 2, 1]


@pytest.mark.parametrize("extra, device, expected", [
    ([], "cuda", GPU_PARALLEL_CASES),
    ([], "cpu", 1),
    (["save_edited=true"], "cuda", 1),
    (["editor.protocol=batch", "editor.batch_size=2"], "cuda", 1),
    (["editor.parallel_cases=3"], "cpu", 3),
    (["editor.parallel_cases=1"], "cuda", 1),
])
def test_parallel_cases_default_to_side_by_side_on_a_gpu_where_the_protocol_allows(extra, device, expected, tiny_dir,
                                                                                   tmp_path):
    assert parallel_cases(run_config(tiny_dir, tmp_path / "run", *extra), torch.device(device)) == expected


def test_a_run_records_how_many_cases_it_ran_side_by_side(tiny_dir, tmp_path):
    out = Experiment(run_config(tiny_dir, tmp_path / "run", "dataset.limit=1")).run()
    assert json.loads((out / "environment.json").read_text())["parallel_cases"] == 1


@pytest.mark.parametrize("extra, message", [
    (["editor.parallel_cases=0"], "must be >= 1"),
    (["editor.parallel_cases=2", "editor.protocol=batch", "editor.batch_size=2"], "only in the single protocol"),
    (["editor.parallel_cases=2", "save_edited=true"], "no edited model to save"),
])
def test_parallel_cases_settings_that_cannot_work_name_the_fix(extra, message, tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=message) as error:
        run_config(tiny_dir, tmp_path / "run", *extra)
    assert "editor.parallel_cases" in str(error.value)


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_parallel_cases_in_bfloat16_give_the_decisions_of_one_at_a_time(name, tokenizer, tmp_path, monkeypatch):
    """In bf16 the wider batch rounds differently, so δs agree only to bf16 precision; the steps and the decisions
    (ties within 1e-2 relative aside) must still be the same."""
    editor = build_editor(name, make_model("llama", dtype=torch.bfloat16), tokenizer, tmp_path, sadr=False)
    single, parallel, _, alone, together = both_ways(editor, name, monkeypatch)
    assert [d.steps_run for d in parallel] == [d.steps_run for d in single]
    for a, b in zip(single, parallel):
        for site in a.deltas:
            torch.testing.assert_close(b.deltas[site], a.deltas[site], rtol=0, atol=5e-2 * a.deltas[site].norm())
    for want, have in zip(alone, together):
        for metric, entry in want.items():
            for i, (good, bad) in enumerate(zip(entry.get("p_good", []), entry.get("p_bad", []))):
                assert abs(good - bad) <= 1e-2 * max(good, bad) or have[metric]["value"][i] == entry["value"][i]


def test_side_by_side_rows_share_their_group_s_evaluation_time_evenly(tiny_dir, tmp_path, monkeypatch):
    """Two cases evaluated together in 6 s (a clock that moves only while evaluating): each row's evaluation
    seconds are 3, so the rows' seconds add up to the group's."""
    import sadr.runner as runner

    clock, evaluate_all = [0.0], runner.evaluate_all

    def six_seconds(*args, **kwargs):
        clock[0] += 6.0
        return evaluate_all(*args, **kwargs)

    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(runner, "evaluate_all", six_seconds)
    out = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor.parallel_cases=2"))).run()
    assert [row["seconds"]["eval_per_case"] for row in written_rows(out)] == [3.0, 3.0]


def test_a_request_that_fails_midway_side_by_side_leaves_the_weights_as_they_were():
    """`apply_each` edits each request into the model as it is and leaves it so, also when one fails after writing
    part of its update (a group out of GPU memory is redone in halves on that model, which must be the unedited one)."""
    from sadr.editors.base import Editor

    model = make_model("llama")
    layers = [1, 2]

    class HalfWriting(Editor):
        def __init__(self):
            self.model, self.adapter, self.layers = model, adapter_for(model), layers

        def apply(self, requests):
            with torch.no_grad():
                self.adapter.down_weight(self.model, 1).add_(1.0)  # the first layer's update is written
            raise torch.cuda.OutOfMemoryError("while writing the second layer's update")

    before = {layer: adapter_for(model).down_weight(model, layer).detach().clone() for layer in layers}
    request = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        HalfWriting().apply_each([request, request])
    for layer in layers:
        assert torch.equal(adapter_for(model).down_weight(model, layer), before[layer])


def test_side_by_side_outcomes_split_the_shared_seconds_and_need_not_report_a_layer_left_alone():
    """`_each_alone` with 3 requests: each outcome's seconds are its own plus a third of the shared ones (update
    1 + 6 / 3 = 3, keys 3 / 3 = 1). An edit of layers [1, 2] that writes and reports layer 1 only is accepted: layer
    2 is unchanged, so no update of it is missing."""
    from sadr.editors.base import EditOutcome, Editor

    model = make_model("llama")

    class FirstLayerOnly(Editor):
        def __init__(self):
            self.model, self.adapter, self.layers = model, adapter_for(model), [1, 2]

        def apply(self, requests):
            out, d_in = self.adapter.down_weight(self.model, 1).shape
            update = LowRankUpdate(torch.ones(out, 1, dtype=torch.float64), torch.ones(d_in, 1, dtype=torch.float64))
            self.adapter.add_to_down_weight(self.model, 1, update)
            return EditOutcome(updates={1: update}, seconds={"update": 1.0})

    editor, request = FirstLayerOnly(), EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")
    outcomes = editor._each_alone([request] * 3, lambda _index, r: editor.apply([r]), {"update": 6.0, "keys": 3.0})
    assert [outcome.seconds for outcome in outcomes] == [{"update": 3.0, "keys": 1.0}] * 3
    assert [list(outcome.updates) for outcome in editor.apply_each([request] * 2)] == [[1], [1]]
