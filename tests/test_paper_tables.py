"""The Table 3 overlays (experiment=table3_*): every job they sweep composes, with the paper's data, editors, SADR
weights and step counts, under the editor settings of the SADR authors' runs."""
from __future__ import annotations

import itertools

import pytest

from sadr.conf.validation import validate
from tests.test_sadr_config import composed

# The SADR repo's GPT-J runs (examples/scripts/{rome,memit,pmet}.sh under examples/run_knowedit.py, whose --lr
# default 0.5 overrides every hparams file): (δ steps, v_lr, γ = CLI weight × 1e-4) without and with SADR.
SADR_REPO_GPTJ = {
    ("rome", "default"): (20, 0.5, 0.0), ("rome", "paper"): (80, 0.5, 0.01),
    ("memit", "default"): (20, 0.5, 0.0), ("memit", "paper"): (20, 0.5, 0.005),
    ("pmet", "default"): (20, 0.5, 0.0), ("pmet", "paper"): (40, 0.5, 0.08),
}
TABLE3_COLUMNS = {"efficacy", "paraphrase", "neighborhood", "relation", "distract_neighborhood"}


def jobs(experiment: str) -> dict[tuple[str, str], object]:
    """(editor, sadr) -> the composed config of each job `sadr-run -m experiment=<experiment>` would run."""
    params = composed([f"experiment={experiment}"], hydra=True).hydra.sweeper.params
    keys = list(params)
    out = {}
    for values in itertools.product(*(str(params[key]).split(",") for key in keys)):
        overrides = dict(zip(keys, values))
        cfg = composed([f"experiment={experiment}", *(f"{k}={v}" for k, v in overrides.items())])
        validate(cfg)
        out[overrides["editor"], overrides["sadr"]] = cfg
    return out


@pytest.mark.parametrize("experiment,model,editors", [
    ("table3_gptj", "gpt-j", {"rome", "memit", "pmet"}),
    ("table3_llama3", "llama3-8b", {"rome", "memit", "pmet"}),
    ("table3_neox", "gpt-neox-20b", {"rome"}),
])
def test_gpu_tables_compose_with_the_papers_settings(experiment, model, editors):
    swept = jobs(experiment)
    assert {editor for editor, _ in swept} == editors and {sadr for _, sadr in swept} == {"default", "paper"}
    for (editor, sadr), cfg in swept.items():
        assert cfg.model.name == model and cfg.editor.name == editor
        assert cfg.dataset.name == "sadr_merged" and cfg.dataset.url.endswith("/data/merged_counterfact.json")
        assert TABLE3_COLUMNS <= set(cfg.eval.metrics) and cfg.eval.generation and cfg.eval.drift
        assert cfg.eval.generation_prompts_per_case is None  # fluency over every generation prompt, as the paper
        # FL's texts as the SADR repo's `generate_fast` samples them: 100 tokens counting the prompt, top-k 5
        assert (cfg.eval.generation_length, cfg.eval.generation_style.name) == (100, "reference")
        assert (cfg.editor.v_num_grad_steps, cfg.editor.v_lr, cfg.sadr["lambda"]) == SADR_REPO_GPTJ[editor, sadr]
        assert cfg.sadr.heads.name == "selective"
        if editor == "pmet" and model == "gpt-j":
            assert cfg.editor.mom2_update_weight == 15000.0  # the SADR repo's, not the PMET repo's 6000


@pytest.mark.parametrize("experiment", ["table3_gptj", "table3_llama3", "table3_neox", "table3_offline"])
def test_every_job_writes_into_the_folder_the_sweeps_tables_are_written_in(experiment):
    """The summarize callback writes the tables into the sweep folder of the launching process's config, where
    every job's folder must be: one named after a key that only the jobs set (a swept model) held no run."""
    def folder(cfg) -> str:
        return str(cfg.hydra.sweep.dir).rsplit("/", 1)[0]  # without the time it was made at

    sweep = composed([f"experiment={experiment}"], hydra=True)
    params = sweep.hydra.sweeper.params
    keys = list(params)
    for values in itertools.product(*(str(params[key]).split(",") for key in keys)):
        job = composed([f"experiment={experiment}", *(f"{k}={v}" for k, v in zip(keys, values))], hydra=True)
        assert folder(job) == folder(sweep)


def test_gptj_table_differs_from_the_published_hparams_only_where_the_sadr_repo_did():
    table = jobs("table3_gptj")
    plain = {editor: composed([f"editor={editor}", "model=gpt-j"]).editor for editor in ("rome", "memit", "pmet")}
    changed = {editor: {key for key in plain[editor] if plain[editor][key] != table[editor, "default"].editor[key]}
               for editor in plain}
    assert changed == {"rome": set(), "memit": {"v_num_grad_steps"},
                       "pmet": {"v_num_grad_steps", "v_lr", "mom2_update_weight"}}


def test_offline_table_runs_the_same_design_on_the_offline_default():
    swept = jobs("table3_offline")
    assert set(swept) == set(SADR_REPO_GPTJ)
    for (editor, sadr), cfg in swept.items():
        assert (cfg.model.name, cfg.dataset.name) == ("smollm2-135m", "offline_counterfact")
        assert TABLE3_COLUMNS <= set(cfg.eval.metrics) and cfg.eval.generation
        assert (cfg.sadr["lambda"] > 0) == (sadr == "paper")
