"""`save_edited=true`: the edited model as a folder that loads anywhere, and that `sadr-run` runs on."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM

from sadr import cache
from sadr.data.load import load_cases
from sadr.evaluation.probes import METRICS
from sadr.evaluation.prompt_metrics import evaluate_cases
from sadr.models.loading import load_model
from sadr.models.saving import EDITS_FILE, save_edited_model, write_model_folder
from sadr.runner import EDITED_MODEL, EDITED_MODELS, SEQUENTIAL_STATE, run_experiment
from tests.runs import composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)
from tests.tiny_models import make_model, make_tokenizer, write_llama_gguf


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_saved_model_reloads_with_the_same_logits(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir / "model"), family="llama", device="cpu", cache_dir=str(tmp_path))
    with torch.no_grad():
        loaded.adapter.down_weight(loaded.model, 1).add_(0.05 * torch.randn_like(loaded.adapter.down_weight(loaded.model, 1)))
    cases = load_cases(composed(tiny_overrides(tiny_dir, tmp_path / "run")).dataset, str(tmp_path)).cases
    umask = os.umask(0o027)  # a group sharing the results: safetensors alone would write the weights as 0o600
    try:
        cache.new_file_mode.cache_clear()
        folder = save_edited_model(loaded, tmp_path / "edited", cases, {"editor": "manual"})
    finally:
        os.umask(umask)
        cache.new_file_mode.cache_clear()
    assert {stat.S_IMODE(file.stat().st_mode) for file in folder.iterdir()} == {0o640}
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert torch.equal(_logits(reloaded, ids), _logits(loaded.model, ids))
    note = json.loads((folder / EDITS_FILE).read_text())
    assert note["editor"] == "manual" and note["n_edits"] == 2 and note["base_model"] == str(tiny_dir / "model")
    assert [e["subject"] for e in note["edits"]] == [c.request.subject for c in cases]
    assert [e["case_id"] for e in note["edits"]] == [c.case_id for c in cases]
    assert not (tmp_path / "edited.partial").exists()


def test_a_folder_written_again_holds_only_the_new_model(tmp_path):
    """An older copy in the folder, and what an interrupted save left beside it, are gone: no stale note or file."""
    folder = tmp_path / "model"
    write_model_folder(make_model("llama"), make_tokenizer(), folder, {EDITS_FILE: "{}"})
    (tmp_path / "model.partial").mkdir()
    (tmp_path / "model.partial" / "stale.bin").write_bytes(b"left by a killed save")
    newer = make_model("llama", seed=1)
    write_model_folder(newer, make_tokenizer(), folder)
    assert not (folder / EDITS_FILE).exists() and not (folder / "stale.bin").exists()
    assert not (tmp_path / "model.partial").exists()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder), ids), _logits(newer, ids))


def test_a_sequential_run_saves_its_edited_model_and_a_run_on_it_starts_from_the_edits(tiny_dir, tmp_path):
    first = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "first", "editor.protocol=sequential",
                                                   "save_edited=true")))
    folder = first / EDITED_MODEL
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()

    # independently: the original weights with the checkpointed edited down-projections written into them
    original = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    state = torch.load(first / SEQUENTIAL_STATE)
    with torch.no_grad():
        for layer, weight in state["editor"]["weights"].items():
            original.model.layers[layer].mlp.down_proj.weight.copy_(weight)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder), ids), _logits(original, ids))

    # a run on the saved model: its unedited scores are the first run's edited ones, prompt by prompt
    second = run_experiment(composed([*tiny_overrides(tiny_dir, tmp_path / "second"), f"model.source={folder}"]))
    assert "edited_model" in (second / "config.yaml").read_text()
    rows = lambda run: {r["case_id"]: r for r in map(json.loads, (run / "cases.jsonl").read_text().splitlines())}  # noqa: E731
    for case_id, row in rows(first).items():
        for metric in ("efficacy", "paraphrase", "neighborhood"):
            edited, reloaded = row["edited"][metric], rows(second)[case_id]["unedited"][metric]
            assert reloaded["p_good"] == pytest.approx(edited["p_good"], rel=1e-4, abs=1e-7)
            assert reloaded["value"] == edited["value"]
    changed = [row["edited"]["efficacy"]["p_good"] != row["unedited"]["efficacy"]["p_good"] for row in rows(first).values()]
    assert all(changed)  # the comparison above is not between two unedited models


def test_single_edits_are_saved_one_folder_per_case_only_when_asked(tiny_dir, tmp_path):
    plain = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "plain", "dataset.limit=1")))
    assert not (plain / EDITED_MODELS).exists()
    saved = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "saved", "dataset.limit=1", "save_edited=true")))
    note = json.loads((saved / EDITED_MODELS / "0" / EDITS_FILE).read_text())
    assert note["protocol"] == "single" and [e["case_id"] for e in note["edits"]] == [0]


def test_an_edit_of_a_gguf_model_is_saved_as_a_folder_that_loads(tiny_dir, tmp_path):
    """The offline default is a GGUF file: its edited weights save like any model's."""
    write_llama_gguf(make_model("llama"), make_tokenizer(pad=False), tmp_path / "tiny.gguf")
    overrides = [f"model.source={tmp_path / 'tiny.gguf'}" if o.startswith("model.source=") else o
                 for o in tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1", "save_edited=true")]
    run = run_experiment(composed(overrides))
    folder = run / EDITED_MODELS / "0"
    edited = load_model(str(folder), family="llama", device="cpu", cache_dir=str(tmp_path))
    row = json.loads((run / "cases.jsonl").read_text().splitlines()[0])
    case = load_cases(composed(overrides).dataset, str(tmp_path)).cases[0]
    [scores] = evaluate_cases(edited.model, edited.tokenizer, [case], [METRICS["efficacy"]])
    assert scores["efficacy"]["p_good"] == pytest.approx(row["edited"]["efficacy"]["p_good"], rel=1e-4)
    assert scores["efficacy"]["p_good"] != pytest.approx(row["unedited"]["efficacy"]["p_good"], rel=1e-2)


def test_a_single_run_killed_while_saving_an_edited_model_has_no_row_for_it_and_the_resume_saves_it(tiny_dir, tmp_path,
                                                                                                    monkeypatch):
    """A case's row is its promise that the case is complete, saved model included: killed during the save, the case
    has no row, and the same command redoes it and saves its folder."""
    from sadr import runner
    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1", "save_edited=true"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_edited_model", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    cases = tmp_path / "run" / "cases.jsonl"
    assert not cases.exists() or cases.read_text().strip() == ""
    monkeypatch.setattr(runner, "save_edited_model", save_edited_model)
    out = run_experiment(cfg)
    assert [json.loads(line)["case_id"] for line in (out / "cases.jsonl").read_text().splitlines()] == [0]
    assert json.loads((out / EDITED_MODELS / "0" / EDITS_FILE).read_text())["n_edits"] == 1
