"""SADR settings as config: `sadr=paper` per (editor, model), the comparison overlay, and its one table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from sadr.conf.registry import compose_config
from sadr.conf.schema import default_cache_dir
from sadr.conf.validation import ConfigError, validate
from sadr.editors.registry import EDITORS
from sadr.evaluation.summary import _order_columns
from tests.test_run import _sadr_run, tiny_dir, tiny_overrides  # noqa: F401  (tiny_dir is a fixture)

CONF = Path(__file__).parents[1] / "sadr" / "conf"
PAPER = CONF / "sadr_hparams" / "paper"
# hparams.md "SADR (released for GPT-J only)": γ and δ steps with SADR, for the paper's three editors.
GPTJ = {"rome": (0.01, 80), "memit": (0.005, 20), "pmet": (0.08, 40)}


def composed(overrides: list[str], hydra: bool = False):
    return compose_config(overrides, checked=False, hydra=hydra)


def test_sadr_is_off_by_default():
    cfg = composed([])
    assert cfg.sadr["lambda"] == 0.0 and cfg.editor.v_num_grad_steps == 20


@pytest.mark.parametrize("environment", [{"SADR_CACHE_DIR": "/data/sadr-cache"}, {"HOME": "/home/someone"}])
def test_the_benchmarks_default_cache_dir_is_the_one_a_run_composes(environment, monkeypatch):
    """SADR_CACHE_DIR where it is set, else ~/.cache/sadr: one default, so a benchmark reads the caches a run wrote."""
    monkeypatch.delenv("SADR_CACHE_DIR", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    expected = environment.get("SADR_CACHE_DIR", "/home/someone/.cache/sadr")
    assert default_cache_dir() == composed([]).cache_dir == expected


def test_sadr_cache_dir_alone_sets_the_default_cache_dir(monkeypatch):
    """A bare container or service may have no HOME; SADR_CACHE_DIR is then enough (OmegaConf resolves oc.env's
    default, $HOME/.cache/sadr, before it reads the variable, so HOME must not be needed to resolve it)."""
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("SADR_CACHE_DIR", "/data/sadr-cache")
    cfg = composed([])
    validate(cfg)
    assert default_cache_dir() == cfg.cache_dir == "/data/sadr-cache"


def test_no_default_cache_dir_without_sadr_cache_dir_or_home_is_a_config_error(monkeypatch):
    """Not /.cache/sadr, a folder at the root, which the default would resolve to: the error says what to set."""
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("SADR_CACHE_DIR", raising=False)
    cfg = composed([])
    for check in (lambda: validate(cfg), default_cache_dir):
        with pytest.raises(ConfigError, match=r"^cache_dir: its default is \$SADR_CACHE_DIR, else \$HOME/\.cache/sadr, "
                                              r"and neither variable is set; set one, or give cache_dir=PATH$"):
            check()
    validate(composed(["cache_dir=/data/sadr-cache"]))


def test_a_given_cache_dir_that_does_not_resolve_is_a_config_error_that_asks_for_a_folder(monkeypatch):
    """Neither SADR_CACHE_DIR nor HOME would change a cache_dir given on the command line."""
    monkeypatch.delenv("SCRATCH", raising=False)
    with pytest.raises(ConfigError, match=r"^cache_dir=\$\{oc\.env:SCRATCH\}/sadr: .*'SCRATCH' not found\S*; give "
                                          r"cache_dir=PATH$"):
        validate(composed(["cache_dir=${oc.env:SCRATCH}/sadr"]))


@pytest.mark.parametrize("editor", GPTJ)
def test_paper_setting_for_gpt_j(editor):
    plain = composed([f"editor={editor}", "model=gpt-j"])
    cfg = composed([f"editor={editor}", "model=gpt-j", "sadr=paper"])
    validate(cfg)
    assert (cfg.sadr["lambda"], cfg.editor.v_num_grad_steps) == GPTJ[editor]
    # only γ and the step count change; the editor's published hyperparameters stay
    assert OmegaConf.to_container(cfg.editor) == {**OmegaConf.to_container(plain.editor), "v_num_grad_steps": GPTJ[editor][1]}
    assert {k: v for k, v in cfg.sadr.items() if k != "lambda"} == {k: v for k, v in plain.sadr.items() if k != "lambda"}


def test_paper_setting_yields_to_the_command_line():
    cfg = composed(["model=gpt-j", "sadr=paper", "sadr.lambda=0.5", "editor.v_num_grad_steps=7", "sadr.heads=all"])
    assert (cfg.sadr["lambda"], cfg.editor.v_num_grad_steps, cfg.sadr.heads.name) == (0.5, 7, "all")


def test_paper_setting_for_a_pair_without_one_names_the_pairs_that_have_one():
    with pytest.raises(MissingConfigException, match=r"sadr_hparams/paper/rome_llama2-7b[\s\S]*rome_gpt-j"):
        composed(["model=llama2-7b", "sadr=paper"])


def test_sadr_run_says_what_to_do_for_a_pair_without_a_paper_or_sadr_repo_setting():
    """What sadr-run prints after Hydra's message (tests/test_cli_errors.py runs it): only for a pair that has no file,
    whatever else is on the command line, and never for a command line that would not compose without the choice."""
    from sadr.conf.advice import missing_pair_setting

    paper = ("sadr=paper: no published SADR setting for editor=memit on model=llama2-7b; choose γ yourself with "
             "sadr.lambda=<γ> instead (and the δ steps with editor.v_num_grad_steps), or add the setting, with its "
             "source, as sadr_hparams/paper/memit_llama2-7b.yaml (in sadr/conf)")
    repo = ("setup=sadr_repo: no run of the SADR authors' code for editor=memit on model=llama2-7b; leave "
            "setup=sadr_repo out to take the published settings, or add the setting, with its source, as "
            "setup_hparams/sadr_repo/memit_llama2-7b.yaml (in sadr/conf)")
    memit = ["model=llama2-7b", "editor=memit", "eval.batch_size=8"]
    assert missing_pair_setting([*memit, "+sadr=paper"]) == paper
    assert missing_pair_setting([*memit, "setup=sadr_repo"]) == repo
    assert missing_pair_setting(["setup=sadr_repo", *memit, "sadr=paper"]) == f"{paper}; and {repo}"
    assert "editor=rome on model=llama2-7b" in missing_pair_setting(["model=llama2-7b", "sadr=paper"])
    for flags in (["--cfg", "job"], ["-c", "all", "--resolve"], ["--config-name=config"]):  # Hydra's own, not overrides
        assert missing_pair_setting([*flags, *memit, "sadr=paper"]) == paper, flags
    assert missing_pair_setting(["setup=sadr_repo"]).startswith("setup=sadr_repo: no run of the SADR authors' code "
                                                                "for editor=rome on model=smollm2-135m;")
    # llama3-8b has both files for memit, neither for alphaedit
    assert missing_pair_setting(["model=llama3-8b", "editor=memit", "sadr=paper", "setup=sadr_repo"]) is None
    assert missing_pair_setting(["model=llama3-8b", "editor=alphaedit", "sadr=paper", "setup=sadr_repo"]).startswith(
        "sadr=paper: no published SADR setting for editor=alphaedit on model=llama3-8b")
    for has_one in (["model=gpt-j", "sadr=paper"], ["sadr=paper"], ["model=gpt-j", "editor=pmet", "sadr=paper"],
                    ["model=gpt-neox-20b", "setup=sadr_repo"]):
        assert missing_pair_setting(has_one) is None, has_one
    for other in (["model=llama2-7b"], ["model=llama2-7b", "sadr=default,paper"], ["model=llama2-7b", "sadr=default"],
                  ["model=llama2-7b", "sadr=paper", "dataset=nope"], ["model=llama2-7b", "sadr=paper", "editor.x=1"]):
        assert missing_pair_setting(other) is None, other


def test_every_setting_names_its_source():
    files = sorted(PAPER.glob("*.yaml"))
    assert {f.stem for f in files} >= {f"{e}_gpt-j" for e in GPTJ} | {f"{e}_smollm2-135m" for e in EDITORS}
    for path in files:
        text = path.read_text()
        assert text.startswith("# @package _global_\n# source: "), path.name
        values = OmegaConf.load(path)
        assert set(values) == {"sadr", "editor"} and set(values.sadr) == {"lambda"}, path.name
        assert set(values.editor) == {"v_num_grad_steps"}, path.name


def test_comparison_overlay_sweeps_every_editor_with_and_without_sadr():
    cfg = composed(["experiment=sadr_comparison"], hydra=True)
    assert dict(cfg.hydra.sweeper.params) == {"editor": "glob(*)", "sadr": "default,paper"}
    assert {"efficacy", "paraphrase", "neighborhood", "distract_neighborhood", "relation"} <= set(cfg.eval.metrics)
    assert cfg.eval.drift
    assert cfg.hydra.callbacks.summarize._target_ == "sadr.evaluation.summary.SummarizeSweep"
    assert "sadr_comparison" in cfg.hydra.sweep.dir


@pytest.mark.parametrize("editor", EDITORS)
@pytest.mark.parametrize("sadr", ["default", "paper"])
def test_every_job_of_the_comparison_composes_for_the_default_model(editor, sadr):
    cfg = composed(["experiment=sadr_comparison", f"editor={editor}", f"sadr={sadr}"])
    validate(cfg)
    assert cfg.model.name == "smollm2-135m"
    assert (cfg.sadr["lambda"] > 0) == (sadr == "paper")


def test_summary_puts_drift_next_to_dns():
    frame = pd.DataFrame(columns=["editor.name", "state", "ES", "ES ci95", "DNS", "DNS ci95", "RS", "RS ci95",
                                  "Drift", "Drift ci95", "Drift mean", "Drift mean ci95"])
    assert list(_order_columns(frame).columns) == [
        "editor.name", "state", "ES", "ES ci95", "DNS", "DNS ci95", "Drift", "Drift ci95", "Drift mean",
        "Drift mean ci95", "RS", "RS ci95"]


def test_comparison_sweep_ends_in_one_table(tiny_dir, tmp_path):  # noqa: F811
    """The overlay's sweep on a tiny model, one editor and two γ (command-line choices replace the overlay's)."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_dir, sweep) if not o.startswith("output_dir=")]
    done = _sadr_run("-m", "experiment=sadr_comparison", *overrides, "editor=rome", "sadr=default",
                     "sadr.lambda=0,10", "eval.generation=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.rglob("metrics.csv"))) == 2
    table = pd.read_csv(sweep / "summary.csv")
    assert sorted(table[table.state == "edited"]["sadr.lambda"]) == [0.0, 10.0]
    assert "editor.v_num_grad_steps" in table.columns
    columns = list(table.columns)
    assert columns[columns.index("DNS ci95") + 1 : columns.index("DNS ci95") + 5] == [
        "Drift", "Drift ci95", "Drift mean", "Drift mean ci95"]
    assert table[table.state == "edited"]["Drift"].notna().all()
    assert "Drift" in (sweep / "summary.md").read_text() and "summary.md" in done.stdout


def test_a_paper_file_s_keys_beyond_gamma_and_steps_are_each_named():
    """A top key that is not a mapping (sadr: 0.25) is named whole, not iterated; the allowed keys are not named."""
    from sadr.conf.registry import _paper_keys_beyond

    node = OmegaConf.create({"sadr": 0.25, "editor": {"v_num_grad_steps": 3, "layers": [1]}, "seed": 1})
    assert _paper_keys_beyond(node) == ["sadr", "editor.layers", "seed"]
    node = OmegaConf.create({"sadr": {"lambda": 0.1, "heads": "all"}, "editor": {"v_num_grad_steps": 3}})
    assert _paper_keys_beyond(node) == ["sadr.heads"]
    assert _paper_keys_beyond(OmegaConf.create({"editor": 3})) == ["editor"]
