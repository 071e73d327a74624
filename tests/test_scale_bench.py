"""benchmarks/scale_bench.py: the published shapes, and its --tiny mode running the real pipeline end to end."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from sadr.results import RunDirectory

SPEC = importlib.util.spec_from_file_location("scale_bench", Path(__file__).parents[1] / "benchmarks" / "scale_bench.py")
scale_bench = sys.modules.setdefault("scale_bench", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(scale_bench)  # puts benchmarks/ on the path
import shapes  # noqa: E402

# Parameter counts published with each model (model cards; GPT-J's includes its 50400-row lm_head bias).
PUBLISHED_PARAMETERS = {"gpt-j": 6_053_381_344, "llama3-8b": 8_030_261_248, "gpt-neox-20b": 20_554_567_680,
                        "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMETERS))
def test_shapes_have_the_published_parameter_counts(arch):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shapes.model_config(arch, tiny=False))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(PUBLISHED_PARAMETERS[arch], rel=1e-3)


def test_tiny_gptj_runs_every_editor_with_and_without_sadr(tmp_path):
    out = tmp_path / "table.md"
    scale_bench.main(["--tiny", "--arch", "gpt-j", "--workdir", str(tmp_path), "--out", str(out)])
    config = AutoConfig.from_pretrained(tmp_path / "gpt-j-random")
    assert (config.model_type, config.n_layer) == ("gptj", 28)  # the published depth: the published layers exist
    results = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert list(results) == ["rome", "rome + SADR (γ=0.01)", "memit", "memit + SADR (γ=0.005)",
                             "pmet", "pmet + SADR (γ=0.08)"]
    for folder in ("rome", "rome_sadr", "memit", "memit_sadr", "pmet", "pmet_sadr"):
        rows = RunDirectory(tmp_path / "runs" / folder).rows()
        assert len(rows) == 2 and all(row["diagnostics"]["delta_steps"] == 3 for row in rows)
        summary = results[{"rome": "rome", "rome_sadr": "rome + SADR (γ=0.01)", "memit": "memit",
                           "memit_sadr": "memit + SADR (γ=0.005)", "pmet": "pmet", "pmet_sadr": "pmet + SADR (γ=0.08)"}[folder]]
        expected_delta = sum(r["seconds"].get("delta", r["seconds"].get("v_star", 0.0)) for r in rows) / 2
        per_step = sorted(r["seconds"].get("delta", r["seconds"].get("v_star", 0.0)) / 3 for r in rows)
        assert summary["delta"] == pytest.approx(expected_delta) and summary["step"] == pytest.approx(sum(per_step) / 2)
        environment = json.loads((tmp_path / "runs" / folder / "environment.json").read_text())
        assert environment["parallel_cases"] == 1  # --parallel-cases 1 by default: s/step is one edit's step
    passes = scale_bench.statistics_passes(tmp_path / "cache")
    assert sorted(p["layers"] for p in passes) == [[3, 4, 6, 7, 8], [5]]  # ROME's layer 5 first, MEMIT's others
    for p in passes:
        assert p["tokens"] > 0 and p["forward_seconds"] >= 0 and p["accumulate_seconds"] >= 0
    table = out.read_text()
    assert "| memit + SADR (γ=0.005) | 2 |" in table and "| layers [5] |" in table


@pytest.mark.parametrize("arch", ["llama3-8b", "gpt-neox-20b"])
def test_tiny_other_shapes_run_rome(arch, tmp_path):
    report = scale_bench.main(["--tiny", "--arch", arch, "--editors", "rome", "--no-sadr", "--records", "1",
                               "--workdir", str(tmp_path)])
    assert "| rome | 1 |" in report
    assert len(RunDirectory(tmp_path / "runs" / "rome").rows()) == 1


def test_variants_run_each_job_once_per_setting_in_folders_of_their_own(tmp_path):
    report = scale_bench.main(["--tiny", "--arch", "llama3-8b", "--editors", "rome", "--no-sadr", "--records", "1",
                               "--workdir", str(tmp_path), "--variants", "editor.prefix_cache=false", ""])
    assert "| rome [editor.prefix_cache=false] | 1 |" in report and "| rome | 1 |" in report
    # the second variant is compared with the first per prompt: float rounding apart, the same edit
    (compared,) = [line for line in report.splitlines() if line.startswith("| rome | 1 |")]
    differing, same_steps = [cell.strip() for cell in compared.split("|")[-3:-1]]
    assert same_steps == "1/1"
    count, total, ties = (int(x) for x in re.fullmatch(r"(\d+)/(\d+) \((\d+)(?:; largest gap \S+)?\)", differing).groups())
    assert total > 0 and count == ties
    for folder, prefix_cache in (("rome", False), ("rome_v1", True)):
        assert len(RunDirectory(tmp_path / "runs" / folder).rows()) == 1
        assert OmegaConf.load(tmp_path / "runs" / folder / "config.yaml").editor.prefix_cache is prefix_cache


def test_the_tie_tolerance_of_variants_is_their_coarsest_rounding():
    assert scale_bench.tie_rtol("float32", ["", "editor.prefix_cache=false"]) == 1e-5
    assert scale_bench.tie_rtol("float32", ["", "tf32=true"]) == 1e-2
    assert scale_bench.tie_rtol("bfloat16", [""]) == 1e-2


def test_a_run_stopped_by_its_time_limit_still_prints_the_runs_that_finished(tmp_path, monkeypatch, capsys):
    """gpu_checks.sh stops a step at its limit with SIGINT: the table keeps the runs before it, and the exit is 130."""
    real_run, calls = scale_bench.run, []

    def second_run_interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args)

    monkeypatch.setattr(scale_bench, "run", second_run_interrupted)
    with pytest.raises(SystemExit) as stop:
        scale_bench.main(["--tiny", "--arch", "llama3-8b", "--editors", "rome", "--records", "1",
                          "--workdir", str(tmp_path)])
    assert stop.value.code == 130 and len(calls) == 2
    printed = capsys.readouterr().out
    report = printed.split("interrupted: the 1 runs that finished before it")[1]
    assert "| rome | 1 |" in report and "| layers [5] |" in report and "| rome + SADR" not in report


def test_the_table_shows_the_peaks_before_the_first_case_while_editing_and_while_evaluating():
    row = {"seconds": {"delta": 1.0, "update": 0.2, "eval_per_case": 0.5}, "diagnostics": {"delta_steps": 4},
           "sadr_lambda": 0.0}
    on_cuda = {**row, "cuda_phase_peak_bytes": {"edit": 3.0e9, "evaluate": 2.0e9}}
    environment = {"one_off_cuda_peak_bytes": {"score_unedited": 1.0e9, "prepare": 4.0e9}}
    summary = scale_bench.run_summary([on_cuda, {**on_cuda, "cuda_phase_peak_bytes": {"edit": 3.5e9}}], environment)
    assert summary["step"] == 0.25
    assert scale_bench.table([("memit", summary)]).splitlines()[-1].endswith("| 4.0 / 3.5 / 2.0 |")
    off_cuda = scale_bench.run_summary([row], {})
    assert scale_bench.table([("memit", off_cuda)]).splitlines()[-1].endswith("| 0.50 | – |")
