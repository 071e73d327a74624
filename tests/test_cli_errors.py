"""Every user mistake ends `sadr-run` with its message and exit status 2, and no traceback.

All cases run as real `python -m sadr.cli.run` processes, CONCURRENT_MISTAKES at a time (each spends most of its
time importing torch and transformers), and are checked one by one. How a started run stops (what it keeps, Ctrl-C, a
bug) and which folders are checked before Hydra starts are checked in this process, with the run itself stubbed.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hydra import initialize_config_module
from omegaconf import OmegaConf
from transformers import OPTConfig

from sadr.cli import run as cli
from sadr.cli.sweep import folder_varied_by_the_sweep, job_that_cannot_run, sweep_jobs, sweep_not_enumerable
from sadr.conf.registry import compose_config, register_configs, sadr_configs
from sadr.errors import DeviceMemoryError, InvalidSettingError, UsageError
from sadr.interrupts import Terminated
from sadr.results import DELTA_CHECKPOINT, SEQUENTIAL_STATE, RunDirectory
from tests.runs import FIXTURE, tiny_dir, tiny_overrides  # noqa: F401  (tiny_dir is a fixture)
from tests.tiny_models import make_model, make_tokenizer

# one per core: all 30 at once took 100 s on 2 cores, 2 at a time 73 s
CONCURRENT_MISTAKES = min(8, os.cpu_count() or 2)

BAD_OVERRIDES = {
    "unknown editor": (["editor=rmoe"], r"Could not find 'editor/rmoe'[\s\S]*Available options in 'editor'[\s\S]*rome"),
    "value of the wrong type": (["sadr.lambda=abc"], r"Value 'abc' of type 'str' could not be converted to Float[\s\S]*full_key: sadr.lambda"),
    "value outside an enum": (["sadr.heads=some"], r"Invalid value 'some', expected one of \[selective, all\][\s\S]*full_key: sadr.heads"),
    "misspelt key": (["editor.v_lrr=0.1"], r"Key 'v_lrr' not in 'RomeConfig'[\s\S]*^error: editor\.v_lrr: editor has no "
                                           r"setting 'v_lrr'; did you mean editor\.v_lr\? editor's settings: name, "),
    "misspelt key of a node typed Any": (["sadr.lamda=0.1"], r"^error: sadr\.lamda: sadr has no setting 'lamda'; did you "
                                                           r"mean sadr\.lambda\?"),
    "another editor's key": (["editor=memit", "editor.rome_update=paper"],
                             r"^error: editor\.rome_update: editor has no setting 'rome_update'; it is a setting of "
                             r"editor=rome, not of editor=memit"),
    "key an earlier release read": (["eval.new_tokens=100"], r"^error: eval\.new_tokens: eval has no setting 'new_tokens'; "
                                                          r"it is now eval\.generation_length, which counts the prompt's"),
    "unknown protocol": (["editor.protocol=serial"], r"expected one of \[single, batch, sequential\]"),
    "unknown fact token": (["editor.fact_token=last"], r"expected one of \[subject_last\]"),
    "negative lambda": (["sadr.lambda=-1"], r"^error: sadr\.lambda=-1\.0: γ must be a finite number >= 0"),
    # Hydra adds a key that no schema declares when asked with '+'; nothing would read it
    "misspelt key added with +": (["+sadr.lamda=0.1"], r"^error: \+sadr\.lamda: sadr has no setting 'lamda', so nothing "
                                                      r"would read it; did you mean sadr\.lambda \(set without '\+'\)\?"),
    "key added with + at the top": (["+foo=1"], r"^error: \+foo: the run config has no setting 'foo'.*settings: model, "),
    "sadr=paper for a pair without a setting": (["model=llama2-7b", "sadr=paper"],
                                                r"Could not find 'sadr_hparams/paper/rome_llama2-7b'[\s\S]*^error: "
                                                r"sadr=paper: no published SADR setting for editor=rome on "
                                                r"model=llama2-7b; choose γ yourself with sadr\.lambda=<γ> instead"),
    "setup=sadr_repo for a pair the authors did not run": (["setup=sadr_repo"],
                                                           r"Could not find 'setup_hparams/sadr_repo/rome_smollm2-135m'"
                                                           r"[\s\S]*^error: setup=sadr_repo: no run of the SADR "
                                                           r"authors' code for editor=rome on model=smollm2-135m"),
    "two modes at once": (["-m", "--cfg", "job"], r"^error: Only one of --run, --multirun, --cfg"),
    # hub models, so that a sweep the check let through would stop at once here, offline
    "sweep whose folder is named after a swept key": (["-m", "experiment=sadr_comparison", "model=tinyllama,llama2-7b"],
                                                      r"^error: this sweep varies model \(model=tinyllama,llama2-7b\), "
                                                      r"and its folder, hydra\.sweep\.dir=outputs/sadr_comparison/"
                                                      r"\$\{model\.name\}_\$\{dataset\.name\}/.*, is named after "
                                                      r"model\.name: .*give the sweep one folder"),
    "sweep with a job out of its domain": (["-m", "model=tinyllama", "sadr.lambda=0.1,-1"],
                                           r"^error: 1 of the sweep's 2 jobs cannot run, so none was started; the "
                                           r"first: model=tinyllama sadr\.lambda=-1: sadr\.lambda=-1\.0: γ must be"),
    "sweep with a pair without its setting": (["-m", "experiment=sadr_comparison", "model=llama3-8b"],
                                              r"^error: 1 of the sweep's 8 jobs cannot run, so none was started; the "
                                              r"first: editor=alphaedit sadr=paper .*: sadr=paper: no published SADR "
                                              r"setting for editor=alphaedit on model=llama3-8b"),
    "sweep with an interval": (["-m", "sadr.lambda=interval(0,1)"],
                               r"^error: sadr\.lambda=interval\(0,1\): Hydra's basic sweeper runs a list of values "
                               r"\(sadr\.lambda=a,b\), range\(\.\.\.\), choice\(\.\.\.\) or glob\(\.\.\.\), not interval"),
    "local model without its folder": (["model=local", "editor.layers=[1]", "editor.v_loss_layer=1"],
                                      r"^error: model=local needs model\.source: a local model folder, a GGUF file"),
}


def _without_subject(path):
    records = json.loads(FIXTURE.read_text())
    broken = copy.deepcopy(records[:2])
    del broken[1]["requested_rewrite"]["subject"]
    path.write_text(json.dumps(broken))
    return path


def _written(path, text):
    path.write_text(text)
    return path


def _a_file(path):
    """A file where a folder is expected (as root, a folder without write permission would still be written)."""
    return _written(path, "")


def _without_weights(path):
    """A saved llama's config and tokenizer, its weights deleted."""
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    (path / "model.safetensors").unlink()
    return path


def _unsupported_family(path):
    """An OPT model's config and tokenizer without weights: the family is refused before any weight is read (a
    20B model of an unsupported family would load for minutes first), so the missing weights are never missed."""
    OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
              max_position_embeddings=64, word_embed_proj_dim=16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The folder the mistakes run in."""
    return tmp_path_factory.mktemp("cli_errors")


@pytest.fixture(scope="module")
def finished(tiny_dir, work):  # noqa: F811
    """{case name: (completed process, expected stderr pattern)} for every mistake, run concurrently."""
    run_dir = work / "runs"

    def tiny(name, *extra):
        return tiny_overrides(tiny_dir, run_dir / name.replace(" ", "_"), *extra)

    cases = dict(BAD_OVERRIDES)
    cases.update({
        "missing dataset file": (tiny("dataset", f"dataset.path={work / 'nope.json'}"), r"^error: dataset file not found: .*nope\.json \(dataset\.path\)"),
        "missing model folder": ([*tiny("folder"), f"model.source={work / 'no_model'}"], r"^error: model directory .*no_model does not exist \(model\.source\)"),
        "unknown model family": ([*tiny("family"), f"model.source={_unsupported_family(work / 'opt')}", "model.family=null"],
                                 r"^error: unsupported model family 'opt' \(config\.model_type\); supported families: .*gpt2"),
        "unsupported model.family": ([*tiny("family_name"), "model.family=foo"],
                                     r"^error: model\.family=foo: not a supported family .*supported: .*gpt2"),
        "folder that is not a model": ([*tiny("not_a_model"), f"model.source={work}"],
                                       r"^error: model directory .* has no config\.json, so it is not a saved model"),
        "layer beyond the model": (tiny("layer", "editor.v_loss_layer=9"),
                                   r"^error: editor\.v_loss_layer=9: the model has layers 0\.\.3"),
        "cache folder that cannot be written": ([*tiny("cache"), f"cache_dir={_a_file(work / 'file_cache')}/cache"],
                                                r"^error: cannot write in .*file_cache/cache \(cache_dir\): .*; set cache_dir="),
        "run folder that cannot be written": (tiny("out", f"output_dir={_a_file(work / 'file_out')}/run"),
                                              r"^error: cannot write in .*file_out/run \(output_dir\): .*; set hydra\.run\.dir="),
        "hydra run folder that cannot be written": (tiny("hydra_out", f"hydra.run.dir={_a_file(work / 'file_hydra')}/run"),
                                                    r"^error: cannot write in .*file_hydra/run \(hydra\.run\.dir\): .*; "
                                                    r"set hydra\.run\.dir="),
        "dataset path that is a folder": (tiny("dataset_folder", f"dataset.path={work}"),
                                          r"^error: dataset file is a directory, not a file: .* \(dataset\.path\)"),
        "model folder without weights": ([*tiny("no_weights"), f"model.source={_without_weights(work / 'no_weights')}"],
                                         r"^error: could not load the model in .*no_weights \(model\.source\): .*"
                                         r"model\.safetensors"),
        "dataset without records": (tiny("no_records", f"dataset.path={_written(work / 'empty.json', '[]')}"),
                                    r"^error: no case to run: .*empty\.json holds no record"),
        "selection that keeps no case": (tiny("no_case", "dataset.limit=0"),
                                         r"^error: no case to run: the selection \(dataset\.limit=0\) keeps none of the 2"),
        "record without its subject": (tiny("record", f"dataset.path={_without_subject(work / 'no_subject.json')}"),
                                       r"^error: .*no_subject\.json.*record 1.*subject"),
        "mistake in its run folder": (["sadr.lambda=-1", f"hydra.run.dir={work / 'logged'}"],
                                      r"^error: sadr\.lambda=-1\.0: γ must be"),
        "hub model without network": ([*tiny("hub"), "model.source=some-org/some-model"],
                                      r"^error: could not load 'some-org/some-model' from the Hugging Face hub \(.*\)\. Without network access, .*"
                                      r"HF_HUB_OFFLINE=1 makes a missing hub model fail at once"),
    })
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)

    def run(name: str) -> tuple:
        args, expected = cases[name]
        done = subprocess.run([sys.executable, "-m", "sadr.cli.run", *args], cwd=work, env=env, text=True,
                              capture_output=True, timeout=600)
        return done.returncode, done.stdout, done.stderr, expected

    with ThreadPoolExecutor(max_workers=CONCURRENT_MISTAKES) as pool:
        return dict(zip(cases, pool.map(run, cases)))


@pytest.mark.parametrize("name", [*BAD_OVERRIDES, "missing dataset file", "missing model folder", "unknown model family",
                                  "unsupported model.family", "folder that is not a model", "layer beyond the model",
                                  "cache folder that cannot be written", "run folder that cannot be written",
                                  "hydra run folder that cannot be written", "dataset path that is a folder",
                                  "model folder without weights",
                                  "dataset without records", "selection that keeps no case", "record without its subject",
                                  "hub model without network", "mistake in its run folder"])
def test_a_mistake_is_one_message_and_exit_status_2(finished, name):
    returncode, stdout, stderr, expected = finished[name]
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr + stdout
    assert re.search(expected, stderr, re.MULTILINE), stderr[-3000:]


def test_the_message_is_also_the_last_record_of_the_run_log(finished, work):
    """A SLURM job's run folder then says why it stopped; the terminal shows the message once."""
    _, stdout, stderr, _ = finished["mistake in its run folder"]
    log_lines = (work / "logged" / "run.log").read_text().splitlines()
    assert log_lines[-1].endswith(f"[ERROR] - {stderr.strip()}"), log_lines
    assert stderr.count("error:") == 1 and "error:" not in stdout


def test_the_command_line_does_not_import_the_runner_before_the_config_composes():
    """A mistake, `--help` or `--cfg` is answered without the runner's imports (seconds of them)."""
    done = subprocess.run([sys.executable, "-c", "import sys, sadr.cli.run; print('sadr.runner' in sys.modules)"],
                          capture_output=True, text=True, timeout=600)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_hydra_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "-m", "sadr.cli.run", "sadr.lambda=-1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def _stopped_in_process(monkeypatch, capsys, out, stop, full_error=None):
    """(exit status, stderr) of `sadr-run` in this process, its run raising `stop` in the run folder `out` (None: the
    run already stubbed); `full_error`: HYDRA_FULL_ERROR's value (None: unset)."""
    def run_experiment(cfg):
        raise stop

    if stop is not None:
        monkeypatch.setattr(cli, "run_experiment", run_experiment)
    monkeypatch.setattr(cli._Stage, "task_started", False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if full_error is not None:
        monkeypatch.setenv("HYDRA_FULL_ERROR", full_error)
    # logging left as it is: Hydra's setup would replace this test session's (later tests read theirs through caplog)
    monkeypatch.setattr(sys, "argv", ["sadr-run", f"hydra.run.dir={out}", "hydra.output_subdir=null",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("stop, status, expected", [
    (InvalidSettingError("a bad value"), 2, "error: a bad value\n"),
    (DeviceMemoryError("out of memory"), 2, "error: out of memory; 1 finished case(s) are kept in {out}: a rerun with "
                                            "hydra.run.dir={out} skips them\n"),
    (KeyboardInterrupt(), 130, "interrupted: 1 finished case(s) are kept in {out}; to resume (finished work is "
                               "skipped), run the same command with hydra.run.dir={out}\n"),
])
def test_a_stopped_run_says_what_is_kept_only_when_it_stopped_midway(stop, status, expected, monkeypatch, capsys,
                                                                    tmp_path):
    """A usage error found before any work names no cases even where an earlier run left one; running out of memory
    and Ctrl-C count the finished case and name the folder to resume in."""
    RunDirectory(tmp_path).append({"case_id": 0})
    assert _stopped_in_process(monkeypatch, capsys, tmp_path, stop) == (status, expected.format(out=tmp_path))


def test_an_interrupted_sequential_run_counts_its_checkpoint_as_kept(monkeypatch, capsys, tmp_path):
    (tmp_path / SEQUENTIAL_STATE).write_bytes(b"")
    status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, KeyboardInterrupt())
    assert status == 130
    assert stderr.startswith("interrupted: the sequential edits checkpointed so far are kept in")
    RunDirectory(tmp_path).append({"case_id": 0})  # killed while writing the rows, after every edit
    status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, KeyboardInterrupt())
    assert stderr.startswith("interrupted: 1 finished case(s) and the sequential edits checkpointed so far are kept in")


def test_a_run_stopped_in_a_group_s_deltas_says_they_are_kept(monkeypatch, capsys, tmp_path):
    """A group's rows come after all of its δs (hours for MEMIT's 10,000 requests): those optimised are kept."""
    (tmp_path / DELTA_CHECKPOINT).mkdir()
    (tmp_path / DELTA_CHECKPOINT / "000000.pt").write_bytes(b"")
    status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, Terminated())
    assert status == 143
    assert stderr.startswith("terminated (SIGTERM): the δs optimised so far in the edit in progress are kept in")
    RunDirectory(tmp_path).append({"case_id": 0})  # an earlier group's row
    status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, KeyboardInterrupt())
    assert stderr.startswith("interrupted: 1 finished case(s) and the δs optimised so far in the edit in progress are "
                             "kept in")


@pytest.mark.parametrize("stop, expected", [
    (KeyboardInterrupt(), r"^interrupted: 1 finished case\(s\) are kept in .*; to resume"),
    (RuntimeError("a bug"), r"^stopped by an error \(a bug: please report it with this traceback\)\nTraceback[\s\S]*"
                            r"RuntimeError: a bug$"),
])
def test_ctrl_c_and_a_bug_are_the_last_record_of_the_log_file(stop, expected, monkeypatch, capsys, tmp_path):
    """Hydra's run.log is a FileHandler of the root logger; the terminal's handlers do not get the record."""
    RunDirectory(tmp_path).append({"case_id": 0})
    log_file, terminal = logging.FileHandler(tmp_path / "run.log"), logging.StreamHandler(io.StringIO())
    for handler in (log_file, terminal):
        monkeypatch.setattr(logging.getLogger(), "handlers", [*logging.getLogger().handlers, handler])
    _stopped_in_process(monkeypatch, capsys, tmp_path, stop)
    log_file.close()
    assert re.search(expected, (tmp_path / "run.log").read_text().strip()) and terminal.stream.getvalue() == ""


def test_a_bug_keeps_its_traceback_and_exit_status_1(monkeypatch, capsys, tmp_path):
    """Only a config that does not compose turns Hydra's exit status 1 into 2; a bug in a started run stays 1."""
    status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, RuntimeError("a bug"))
    assert status == 1 and "Traceback" in stderr and "RuntimeError: a bug" in stderr


def test_in_a_multirun_the_resume_override_names_the_sweep_folder(monkeypatch, tmp_path):
    """Rerunning a sweep with hydra.run.dir=<one job's folder> would not resume the sweep."""
    for mode, expected in ((cli.RunMode.MULTIRUN, f"hydra.sweep.dir={tmp_path}"),
                           (cli.RunMode.RUN, "hydra.run.dir=job")):
        hydra_cfg = OmegaConf.create({"mode": mode, "sweep": {"dir": str(tmp_path)}})
        monkeypatch.setattr(cli.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
        assert cli._where_to_resume("job") == expected


def _launching_config(task: list[str], params: dict | None = None, pattern: str = "out/${model.name}_${dataset.name}",
                      hydra_overrides: tuple[str, ...] = ()):
    """What the launching process of `sadr-run -m <task>` holds: its sweep folder's pattern, the sweep's params from
    the config and the command line's overrides."""
    return OmegaConf.create({"hydra": {"sweep": {"dir": pattern}, "sweeper": {"params": params},
                                       "overrides": {"task": task, "hydra": list(hydra_overrides)}}})


def _jobs_checked(task: list[str], params: dict | None = None, hydra_overrides: tuple[str, ...] = ()):
    """`job_that_cannot_run` of a launching config whose sweep folder is its jobs' (hydra.sweep.dir=out)."""
    return job_that_cannot_run(_launching_config(task, params, pattern="out",
                                                 hydra_overrides=("hydra.sweep.dir=out", *hydra_overrides)))


def test_a_sweep_whose_folder_would_differ_between_its_jobs_is_refused():
    """The folder's pattern is checked against what the sweep varies, from the command line or the config's params
    (a single value on the command line replaces a swept one), and an experiment swept sets the folder itself."""
    varies = folder_varied_by_the_sweep
    assert "varies model (model=a,b)" in varies(_launching_config(["model=a,b"]))
    assert "is named after dataset.name" in varies(_launching_config(["dataset.name=x,y"]))
    assert "is named after model:" in varies(_launching_config(["model.dtype=float32,bfloat16"], pattern="out/${model}"))
    assert "varies model (model=a,b)" in varies(_launching_config([], params={"model": "a,b", "editor": "rome"}))
    assert varies(_launching_config(["model=a"], params={"model": "a,b"})) is None
    assert varies(_launching_config(["model.dtype=float32,bfloat16", "editor=rome,memit", "model=a"])) is None
    assert varies(_launching_config(["model=a,b"], pattern="out/${now:%H-%M-%S}")) is None
    assert "is set by each experiment" in varies(_launching_config(["experiment=e,f"], pattern="out/${now:%H}"))
    assert varies(_launching_config(["experiment=e,f"], hydra_overrides=("hydra.sweep.dir=out",))) is None
    assert varies(_launching_config(["experiment=e,f"], hydra_overrides=("++hydra.sweep.dir=out",))) is None
    # a key whose name merely starts with the swept one's is another key
    assert varies(_launching_config(["eval.generation=true,false"], pattern="out/${eval.generation_length}")) is None


def test_a_sweep_s_jobs_are_those_hydra_s_basic_sweeper_runs():
    """A key with and without `+`/`++` is two overrides to Hydra, both in every job, and an override's `${...}` is
    resolved in each job's config, not in the launching one."""
    assert sweep_jobs(_launching_config(["sadr.lambda=0,0.1", "++sadr.lambda=0.5"])) == [
        ["sadr.lambda=0", "++sadr.lambda=0.5"], ["sadr.lambda=0.1", "++sadr.lambda=0.5"]]
    jobs = sweep_jobs(_launching_config(["editor=rome,memit", "output_dir=runs/${editor.name}"]))
    assert [compose_config(job, checked=False).output_dir for job in jobs] == ["runs/rome", "runs/memit"]


@pytest.mark.parametrize("task, params", [
    (["sadr.lambda=0,0.1", "++sadr.lambda=0.5", "editor=rome"], None),
    (["editor=glob(*,exclude=alphaedit)", "sadr.lambda=range(0,0.3,0.1)", "seed=choice(1,2)"], None),
    (["sadr.lambda=sort(0.2,0.1,reverse=true)", "seed=tag(t,choice(3,4))", "dataset.limit=3", "dataset.limit=2,4"], None),
    (["editor=memit", "output_dir='a,b'", "sadr.lambda=0,1"], {"editor": "rome,pmet", "sadr.lambda": "0.5"}),
])
def test_a_sweep_s_jobs_are_expanded_as_hydra_s_basic_sweeper_expands_them(task, params):
    """The same jobs, in the same order, as Hydra's own expansion (a private function of Hydra's, read here only)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    register_configs()
    with sadr_configs():
        config = _launching_config(task, params)
        ours = sweep_jobs(config)
        lines = [f"{key}={value}" for key, value in (params or {}).items()] + task
        parsed = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(lines)
        assert ours == BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    assert len(ours) > 1


def test_a_sweep_with_an_interval_is_refused_with_what_the_basic_sweeper_runs():
    """Hydra's basic sweeper refuses interval(...) even where a later override replaces it, with a traceback, and
    what these checks raise is only a warning to Hydra: they name it first."""
    refused = sweep_not_enumerable(_launching_config(["sadr.lambda=0.1"], params={"sadr.lambda": "interval(0,1)"}))
    assert refused.startswith("sadr.lambda=interval(0,1): Hydra's basic sweeper runs a list of values"), refused
    assert refused.endswith("give the values, e.g. sadr.lambda=range(0,1,0.25)"), refused
    assert sweep_not_enumerable(_launching_config(["sadr.lambda=range(0,1,0.25)", "editor=glob(*)"])) is None


def test_a_sweep_with_a_job_that_cannot_run_is_refused_before_any_starts():
    """Every job is composed and checked as its run would check it, with the config's params and the command line's
    sweeps combined; a missing local file is left to the job (a cluster's job may see it)."""
    refused = _jobs_checked(["model=tinyllama", "sadr.lambda=0.1,-1,2,-3"])
    assert refused.startswith("2 of the sweep's 4 jobs cannot run, so none was started; the first: model=tinyllama "
                              "sadr.lambda=-1: sadr.lambda=-1.0: γ must be a finite number >= 0"), refused
    refused = _jobs_checked(["model=llama3-8b"], params={"editor": "rome,alphaedit", "sadr": "default,paper"})
    assert refused.startswith("1 of the sweep's 4 jobs cannot run, so none was started; the first: editor=alphaedit "
                              "sadr=paper model=llama3-8b: sadr=paper: no published SADR setting"), refused
    assert _jobs_checked(["editor=rome,memit", "sadr.lambda=0,0.1"]) is None
    assert _jobs_checked(["model=local", "model.source=/nonexistent/model,/elsewhere/model", "editor.layers=[1]",
                                "editor.v_loss_layer=2"]) is None


def _composed_launching_config(arguments: list[str]):
    """The config that `sadr-run -m <arguments>` starts its sweep with, as Hydra composes it (within sadr_configs())."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    return GlobalHydra.instance().hydra.compose_config("config", arguments, run_mode=RunMode.MULTIRUN,
                                                      with_log_configuration=False)


def test_a_sweep_whose_jobs_would_not_run_their_own_sweeps_is_refused():
    """Each experiment's hydra.sweeper.params would be ignored in a sweep of experiments (Hydra reads them from the
    launching config, which has no experiment): each job would be one run, not the experiment's comparison."""
    register_configs()
    with sadr_configs():
        refused = job_that_cannot_run(_composed_launching_config(["experiment=sadr_comparison,table3_offline",
                                                                  "hydra.sweep.dir=out"]))
        assert job_that_cannot_run(_composed_launching_config(["experiment=table3_offline", "editor=rome,memit"])) \
            is None
    assert refused.startswith("2 of the sweep's 2 jobs cannot run, so none was started; the first: "
                              "experiment=sadr_comparison: its config sweeps editor=glob(*) sadr=default,paper "
                              "(hydra.sweeper.params), which no job would run"), refused
    assert refused.endswith("Run one sweep per experiment (sadr-run -m experiment=<name>)"), refused
    assert folder_varied_by_the_sweep(_launching_config(["experiment=e,f"])).endswith("Run one sweep per value")


def test_a_sweep_whose_jobs_resolve_another_sweep_folder_is_refused():
    """Hydra's launchers resolve each job's sweep folder in the job's config, and the sweep's tables go into the
    launching config's: a folder named after a swept key through Hydra's node, which the pattern's text does not
    name, is one folder per value. `${now:...}` is the time the sweep started in every job."""
    register_configs()
    with sadr_configs():
        def checked(*arguments):
            return job_that_cannot_run(_composed_launching_config(list(arguments)))

        refused = checked("model=smollm2-135m,tinyllama", "hydra.sweep.dir=out/${hydra.runtime.choices.model}")
        by_overrides = checked("editor=rome,memit", "hydra.sweep.dir=out/${hydra.job.override_dirname}")
        assert checked("editor=rome,memit", "hydra.sweep.dir=out/${now:%H-%M-%S-%f}") is None
        unresolvable = checked("editor=rome,memit", "hydra.sweep.dir=out/${hydra:runtime.choices.model}")
    assert refused == ("1 of the sweep's 2 jobs cannot run, so none was started; the first: model=tinyllama: its run "
                       "would be in the sweep folder out/tinyllama "
                       "(hydra.sweep.dir=out/${hydra.runtime.choices.model}), not in the sweep's, out/smollm2-135m, "
                       "where the sweep's tables are written: a value the sweep varies changes the folder. Give the "
                       "sweep one folder (hydra.sweep.dir=<folder>)"), refused
    assert by_overrides.startswith("2 of the sweep's 2 jobs cannot run, so none was started; the first: editor=rome: "
                                   "its run would be in the sweep folder out/editor=rome "), by_overrides
    assert unresolvable.startswith("hydra.sweep.dir=out/${hydra:runtime.choices.model} cannot be resolved in the "
                                   "config that the sweep starts with"), unresolvable


def test_a_resumed_sweep_whose_jobs_would_find_other_runs_is_refused(tmp_path):
    """A sweep resumed in its folder finds each job's run by the job's number: with a value added in the middle, job
    1 would find job 2's run and stop only when it started, after job 0. Checked without writing anything; the
    same sweep resumes, and a folder whose run finished nothing is left to the job (it replaces that config)."""
    folder = tmp_path / "sweep"
    for number, lam in ((0, 0), (1, 0.2)):
        run = RunDirectory(folder / str(number))
        run.claim(compose_config([f"sadr.lambda={lam}", f"output_dir={run.path}"]))
        run.append({"case_id": 0})
    RunDirectory(folder / "2").claim(compose_config(["sadr.lambda=0.5", f"output_dir={folder / '2'}"]))
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    register_configs()
    with sadr_configs():
        def checked(values):
            return job_that_cannot_run(_composed_launching_config([f"sadr.lambda={values}",
                                                                   f"hydra.sweep.dir={folder}"]))

        assert checked("0,0.2,0.3,0.4") is None
        refused = checked("0,0.1,0.2")
    assert refused == (f"1 of the sweep's 3 jobs cannot run, so none was started; the first: sadr.lambda=0.1: its "
                       f"folder, {folder / '1'}, holds a run of other settings (differs in: sadr.lambda (0.2 in the "
                       f"run, 0.1 now)), which the job would refuse only when it starts, after the jobs before it: "
                       f"this sweep's jobs are not those of the sweep that wrote the folder (each job's folder is "
                       f"hydra.sweep.subdir=${{hydra.job.num}}), e.g. a value was added or removed, or glob(...) lists "
                       f"other options. Resume with the values of the first launch, in their order, or give this "
                       f"sweep another folder (hydra.sweep.dir=<folder>)"), refused
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before
    # a run that differs from its job only in keys the sweep does not vary (here seed; on a cluster, cache_dir read
    # from the login node's environment) is left to the job, which sees its own environment
    run = RunDirectory(tmp_path / "other" / "0")
    run.claim(compose_config(["sadr.lambda=0", "seed=5", f"output_dir={run.path}"]))
    run.append({"case_id": 0})
    with sadr_configs():
        assert job_that_cannot_run(_composed_launching_config(["sadr.lambda=0,0.2",
                                                               f"hydra.sweep.dir={tmp_path / 'other'}"])) is None


def test_a_bug_in_a_job_s_checks_is_raised_not_reported_as_a_job_that_cannot_run(monkeypatch):
    """Only composing a job may fail in any way (Hydra's and OmegaConf's errors of a config); an exception of the
    checks after it is a bug, which SweepChecks stops the sweep with, traceback and all."""
    from sadr.cli import sweep

    def bug(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sweep, "_check_no_sweep_of_its_own", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        _jobs_checked(["sadr.lambda=0,0.1"])


def test_a_bug_in_a_sweep_s_checks_stops_the_sweep_with_its_traceback(monkeypatch, capsys, tmp_path):
    """Hydra turns an exception in a callback into a warning (a private class of Hydra's, used here only), after
    which the sweep would start unchecked: a bug stops it, with its traceback and how to run without the checks."""
    from hydra._internal.callbacks import Callbacks

    from sadr.cli import sweep

    def bug(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sweep, "job_that_cannot_run", bug)
    monkeypatch.setattr(sweep.SweepChecks, "stopped_on_a_bug", False)  # the checks set it: restored to False after
    checks = {"checks": {"_target_": "sadr.cli.sweep.SweepChecks"}}
    callbacks = Callbacks(OmegaConf.create({"hydra": {"callbacks": checks}}))
    with pytest.raises(SystemExit) as stopped:
        callbacks.on_multirun_start(config=_launching_config(["editor=rome,memit"], pattern="out"))
    err = capsys.readouterr().err
    assert stopped.value.code == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: a bug" in err, err
    assert err.endswith("error: the sweep's checks stopped on a bug (please report it with this traceback), before "
                        "any job started; to run the sweep without them meanwhile, add "
                        "~hydra.callbacks.sweep_checks\n"), err
    # logging left as it is: Hydra's setup would replace this test session's (later tests read theirs through caplog)
    monkeypatch.setattr(sys, "argv", ["sadr-run", "-m", "sadr.lambda=0,0.1", f"hydra.sweep.dir={tmp_path}",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    monkeypatch.setattr(sweep.SweepChecks, "stopped_on_a_bug", False)
    with pytest.raises(SystemExit) as stopped:  # not taken for Hydra's exit status 1 of a usage error
        cli.main()
    assert stopped.value.code == 1 and "RuntimeError: a bug" in capsys.readouterr().err


def test_a_sweep_whose_jobs_would_share_a_folder_is_refused():
    """Two jobs in one folder: the second finds the first's run, with other settings, and stops after it."""
    def shared(*overrides):
        return _jobs_checked(["editor=rome,memit"], hydra_overrides=overrides)

    refused = shared("hydra.sweep.subdir=same")
    assert refused == ("1 of the sweep's 2 jobs cannot run, so none was started; the first: editor=memit: it would run "
                       "in the folder of job 0 (editor=rome), same (hydra.sweep.subdir=same), which holds one run: give "
                       "each job a folder of its own, e.g. hydra.sweep.subdir=${hydra.job.num} (the default)"), refused
    assert "(hydra.sweep.subdir=${model.name})" in shared("hydra.sweep.subdir=${model.name}")
    assert shared("hydra.sweep.subdir=${editor.name}") is None
    assert shared("hydra.sweep.subdir=run_${hydra:job.num}") is None
    assert shared("hydra.sweep.subdir=${hydra.job.override_dirname}") is None


def test_a_misspelt_metric_is_refused_by_the_config_checks(tmp_path):
    """Checked with the config, not once the run has claimed its folder: a sweep refused it only once its job had
    started (leaving an unfinished run), and a run in a folder of another config was told to choose a new folder."""
    from sadr.results import RunDirectory

    with pytest.raises(InvalidSettingError, match=r"^unknown metric\(s\) \['efficacyy'\] in eval\.metrics; known: "
                                                  r"efficacy, "):
        compose_config(["eval.metrics=[efficacyy]"])
    refused = _jobs_checked(["eval.metrics=[efficacy],[efficacyy]"])
    assert refused.startswith("1 of the sweep's 2 jobs cannot run, so none was started; the first: "
                              "eval.metrics=[efficacyy]: unknown metric(s) ['efficacyy']"), refused
    run = RunDirectory(tmp_path / "run")
    run.claim(compose_config([f"output_dir={run.path}"]))
    run.append({"case_id": 0})
    done = subprocess.run([sys.executable, "-m", "sadr.cli.run", f"hydra.run.dir={run.path}", "eval.metrics=[ES,NS]"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: unknown metric(s) ['ES', 'NS'] in eval.metrics"), \
        done.stderr


def test_a_sweep_s_checks_compose_within_sadr_run_s_own_hydra():
    """In `sadr-run`, Hydra is initialised already: the checks compose there, and glob(*) lists the editors."""
    register_configs()  # as sadr-run's main() does before Hydra starts (the test passed alone only after others)
    with initialize_config_module(config_module="sadr.conf", version_base="1.3"):
        assert _jobs_checked(["editor=glob(*)"]) is None
        refused = _jobs_checked(["editor=glob(*)", "sadr=paper", "model=llama3-8b"])
    assert refused.startswith("1 of the sweep's 4 jobs cannot run"), refused


def test_run_and_sweep_folders_are_checked_only_where_hydra_would_make_them(tmp_path):
    """A folder with an interpolation is Hydra's to resolve (no literal '${now:...}' folder is made); `--cfg` makes
    none; `+` before the key still names a folder."""
    cli._check_hydra_folders([f"hydra.run.dir={tmp_path}/" + "${now:%H}", "hydra.sweep.dir=" + str(tmp_path / "made")])
    assert [p.name for p in tmp_path.iterdir()] == ["made"]
    blocked = _a_file(tmp_path / "file")
    cli._check_hydra_folders(["--cfg", "job", f"hydra.run.dir={blocked}/run"])
    with pytest.raises(UsageError, match=r"cannot write in .*file/run \(hydra\.run\.dir\)"):
        cli._check_hydra_folders([f"+hydra.run.dir={blocked}/run"])


class RecordedInterrupts:
    """SIGINT and SIGTERM handlers for the test's duration that record each signal delivered to them instead of
    raising or killing the process (a SIGTERM not ignored then fails the test instead of ending the suite)."""

    def __init__(self):
        self.received = []
        previous = {signum: signal.signal(signum, lambda received, frame: self.received.append(received))
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        self.restore = lambda: [signal.signal(signum, handler) for signum, handler in previous.items()]

    def interrupt_again(self, signum: int = signal.SIGINT) -> None:
        """A second SIGINT to this process (Ctrl-C pressed again; `timeout -s INT` signals the process, then its
        group), or a SIGTERM after it, given time to be handled."""
        os.kill(os.getpid(), signum)
        time.sleep(0.2)


@pytest.mark.parametrize("again", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_interrupt_while_a_run_says_what_it_keeps_is_ignored(again, monkeypatch, capsys, tmp_path):
    """It arrives while the rows are counted (seconds, for a large run): the line is still whole, and the signal is
    handled again afterwards."""
    RunDirectory(tmp_path).append({"case_id": 0})
    interrupts, counted = RecordedInterrupts(), cli._kept
    try:
        monkeypatch.setattr(cli, "_kept", lambda output_dir: (interrupts.interrupt_again(again),
                                                             counted(output_dir))[1])
        status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, KeyboardInterrupt())
        assert (status, stderr.startswith("interrupted: 1 finished case(s) are kept in")) == (130, True)
        assert interrupts.received == []
        os.kill(os.getpid(), again)
        assert interrupts.received == [again]  # the handler before is back
    finally:
        interrupts.restore()


def test_a_second_interrupt_while_a_sweep_s_launcher_waits_for_its_jobs_is_ignored(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    interrupts = RecordedInterrupts()
    try:
        monkeypatch.setattr(cli, "_main", interrupted)
        monkeypatch.setattr(cli, "_wait_for_child_processes", lambda timeout: interrupts.interrupt_again())
        monkeypatch.setattr(cli.SweepFolder, "started", None)
        monkeypatch.setattr(sys, "argv", ["sadr-run", "-m"])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        with pytest.raises(SystemExit) as stopped:
            cli.main()
        assert stopped.value.code == 130
        assert capsys.readouterr().err == "interrupted: before the run started; nothing was computed\n"
        assert interrupts.received == []
    finally:
        interrupts.restore()


def _sigterm_inside_the_run(received: list):
    """A stand-in run that sends this process SIGTERM and gives a handler time to act; refused (so that the test
    fails rather than its process dies) where SIGTERM would kill the process."""
    def run_experiment(cfg):
        handler = signal.getsignal(signal.SIGTERM)
        received.append(handler)
        assert handler not in (signal.SIG_DFL, None), "SIGTERM would kill the process"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)

    return run_experiment


def test_sigterm_stops_a_run_as_ctrl_c_does_with_exit_status_143(monkeypatch, capsys, tmp_path):
    """A SLURM job's time limit sends SIGTERM: the job's log says what is kept and how to resume, as for Ctrl-C, and
    SIGTERM's default action is back afterwards."""
    RunDirectory(tmp_path).append({"case_id": 0})
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        handlers = []
        monkeypatch.setattr(cli, "run_experiment", _sigterm_inside_the_run(handlers))
        status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, None)
        assert status == 143 and len(handlers) == 1
        assert stderr == (f"terminated (SIGTERM): 1 finished case(s) are kept in {tmp_path}; to resume (finished work "
                          f"is skipped), run the same command with hydra.run.dir={tmp_path}\n")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_handler_already_set_is_left_alone(monkeypatch, tmp_path):
    """Submitit's jobs set their own (they log SIGTERM and go on): the run neither replaces nor removes it."""
    received = []
    recorded = lambda signum, frame: received.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, recorded)
    try:
        handlers = []
        monkeypatch.setattr(cli, "run_experiment", _sigterm_inside_the_run(handlers))
        monkeypatch.setattr(cli._Stage, "task_started", False)
        monkeypatch.setattr(sys, "argv", ["sadr-run", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null",
                                          "hydra/job_logging=none", "hydra/hydra_logging=none"])
        cli.main()
        assert handlers == [recorded] and received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is recorded
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_before_any_case_finished_says_that_none_is_kept(monkeypatch, capsys, tmp_path):
    """An empty run folder still gets the whole line: what is kept (nothing yet) and how to resume."""
    status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, KeyboardInterrupt())
    assert (status, stderr) == (130, f"interrupted: 0 finished case(s) are kept in {tmp_path}; to resume (finished "
                                     f"work is skipped), run the same command with hydra.run.dir={tmp_path}\n")


def test_a_damaged_cases_file_found_while_stopping_is_named_without_hiding_the_stop(monkeypatch, capsys, tmp_path):
    """The kept rows cannot be counted (a case written twice): the line names the damage and still says that the run
    was interrupted and how to resume, with Ctrl-C's exit status, not a traceback about the file."""
    (tmp_path / "cases.jsonl").write_text('{"case_id": 0}\n{"case_id": 0}\n')
    status, stderr = _stopped_in_process(monkeypatch, capsys, tmp_path, KeyboardInterrupt())
    assert status == 130 and "Traceback" not in stderr
    assert stderr.startswith(f"interrupted: the cases in it (not counted: line 2 of {tmp_path / 'cases.jsonl'} is a "
                             "second row of case 0"), stderr
    assert stderr.endswith(f") are kept in {tmp_path}; to resume (finished work is skipped), run the same command "
                           f"with hydra.run.dir={tmp_path}\n"), stderr


def test_hydra_full_error_other_than_1_leaves_the_one_line_message(monkeypatch, capsys, tmp_path):
    """Hydra shows the traceback for HYDRA_FULL_ERROR=1 alone; HYDRA_FULL_ERROR=0 is the default behaviour."""
    stop = InvalidSettingError("a bad value")
    assert _stopped_in_process(monkeypatch, capsys, tmp_path, stop, full_error="0") == (2, "error: a bad value\n")


def test_a_config_that_does_not_compose_and_has_no_advice_is_hydra_s_message_alone(monkeypatch, capsys):
    """An unknown editor: Hydra names the options, exit status 2, and no `error:` line of sadr's follows it."""
    monkeypatch.setattr(cli._Stage, "task_started", False)
    monkeypatch.setattr(cli.SweepChecks, "stopped_on_a_bug", False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["sadr-run", "editor=rmoe"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2 and "Could not find 'editor/rmoe'" in stderr, stderr
    assert not re.search(r"^error:", stderr, re.MULTILINE), stderr


def test_under_a_debugger_a_value_error_in_the_run_keeps_its_traceback(monkeypatch, tmp_path):
    """Under pdb Hydra raises a task's exception instead of exiting with status 1: a ValueError from the run is a
    bug, not Hydra's check of the command line (which is printed as one `error:` line)."""
    import hydra._internal.utils

    def run_experiment(cfg):
        raise ValueError("a bug")

    monkeypatch.setattr(hydra._internal.utils, "is_under_debugger", lambda: True)
    monkeypatch.setattr(cli, "run_experiment", run_experiment)
    monkeypatch.setattr(cli._Stage, "task_started", False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["sadr-run", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(ValueError, match="^a bug$"):
        cli.main()


@pytest.mark.parametrize("flag", ["-c", "-h", "--info"])
def test_hydra_s_short_and_info_flags_make_no_folder_either(flag, tmp_path):
    """`-c` is `--cfg`, `-h` `--help`: like `--info`, Hydra makes no run folder for them, so none is checked."""
    blocked = _a_file(tmp_path / "file")
    cli._check_hydra_folders([flag, "job", f"hydra.run.dir={blocked}/run"])  # no UsageError


def test_a_sweep_s_launcher_stopped_by_ctrl_c_removes_submitit_s_empty_pattern_folder(monkeypatch, capsys, tmp_path):
    """The jobs had not started (no folder of their own in the pattern's place): the '%j' folder goes, and the line
    names the sweep folder to resume in."""
    def interrupted():
        raise KeyboardInterrupt

    pattern = tmp_path / ".submitit" / "%j"
    pattern.mkdir(parents=True)
    monkeypatch.setattr(cli, "_main", interrupted)
    monkeypatch.setattr(cli, "_wait_for_child_processes", lambda timeout: None)
    monkeypatch.setattr(cli.SweepFolder, "started", str(tmp_path))
    monkeypatch.setattr(cli.SweepFolder, "job_pattern", str(pattern))
    monkeypatch.setattr(sys, "argv", ["sadr-run", "-m"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 130 and not pattern.exists()
    assert capsys.readouterr().err.endswith(f"run the same command with hydra.sweep.dir={tmp_path}\n")


def test_the_launcher_waits_for_its_child_processes_until_they_end_or_the_timeout():
    """A child that ends in 0.5 s is waited for; with none left the wait ends at once; one that outlives the timeout
    is given up on after it."""
    child = subprocess.Popen(["sleep", "0.5"])
    started = time.monotonic()
    cli._wait_for_child_processes(timeout=10.0)
    assert 0.3 < time.monotonic() - started < 5
    started = time.monotonic()
    cli._wait_for_child_processes(timeout=10.0)  # no child left
    assert time.monotonic() - started < 1
    child.wait()
    lasting = subprocess.Popen(["sleep", "30"])
    try:
        started = time.monotonic()
        cli._wait_for_child_processes(timeout=0.5)
        assert 0.4 < time.monotonic() - started < 5 and lasting.poll() is None
    finally:
        lasting.kill()
        lasting.wait()


def test_hydra_full_error_lets_ctrl_c_through_with_its_traceback(monkeypatch, capsys, tmp_path):
    """HYDRA_FULL_ERROR=1 asks for the traceback of any stop: Ctrl-C is raised as it is, not turned into the line that
    says what is kept (exit status 130)."""
    with pytest.raises(KeyboardInterrupt):
        _stopped_in_process(monkeypatch, capsys, tmp_path, KeyboardInterrupt(), full_error="1")
