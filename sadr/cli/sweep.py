"""What a `sadr-run -m` process checks before its sweep's first job starts, and the folder of the sweep it launched.

Checked first (`SweepChecks`), so that a mistake stops the sweep before hours of jobs, not after them:
- every job passes the run's checks of its config: a value out of its domain in one job (`sadr.lambda=0.1,-1`) stopped
  a sweep in one process at that job, after the jobs before it, or made one job of a SLURM array fail, and the
  sweep's tables were never written. Hydra composes every job before the first starts too, but its message for one
  that does not compose (`experiment=sadr_comparison model=llama3-8b`: AlphaEdit has no `sadr=paper` setting there)
  names neither the job nor the fix;
- the sweep has one folder: a folder named after a key the sweep varies (`experiment=sadr_comparison
  model=gpt-j,llama3-8b`, whose folder is `.../${model.name}_${dataset.name}/...`) would be one folder per value for
  the jobs, and for the launching process, whose config has none of the swept values, a third one, where the sweep's
  tables would find no run;
- each job has a run folder of its own, and a resumed sweep's job finds its own run there, not another job's;
- each job is the run it looks like: in a sweep of experiments, each experiment's own sweep would not run;
- the sweep is one Hydra's basic sweeper can list (no `interval(...)`).

A launcher that runs each job in a process of its own (hydra/launcher=local, gpus, slurm) keeps no job config in
the launching process, and a sweep folder named by the time (`${now:...}`) can only be read from the config that the
sweep started with: `SweepFolder` (config.yaml, `hydra.callbacks.sweep_folder`) keeps it, for the line a Ctrl-C
prints. At the sweep's end it also removes the empty folder that submitit makes of its folder pattern itself
(`.submitit/%j`), as `sadr-run` does when Ctrl-C stops the sweep.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from sadr.conf.advice import misspelt_override, missing_pair_setting
from sadr.conf.registry import compose_config
from sadr.conf.validation import ConfigError, validate
from sadr.errors import MissingInputError, UsageError
from sadr.results import CONFIG_FILE, RunDirectory

# `${model.name}` in a folder's pattern; not a resolver's call, such as `${now:%H-%M-%S}`
REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.-]*)\}")
# the group whose options set the sweep's folder themselves (sadr/conf/experiment/*.yaml), unless the command line does
FOLDER_SETTING_GROUP = "experiment"


class SweepChecks(Callback):
    stopped_on_a_bug = False  # for `sadr-run`, which takes Hydra's exit status 1 before a run starts for a usage error

    def on_multirun_start(self, config, **kwargs) -> None:
        """A bug in the checks stops the sweep with its traceback: Hydra turns a callback's exception into a one-line
        warning, and the sweep would then start unchecked. SystemExit passes Hydra's callbacks."""
        try:
            problem = sweep_not_enumerable(config) or folder_varied_by_the_sweep(config) or job_that_cannot_run(config)
        except Exception:
            traceback.print_exc()
            SweepChecks.stopped_on_a_bug = True
            print("error: the sweep's checks stopped on a bug (please report it with this traceback), before any job "
                  "started; to run the sweep without them meanwhile, add ~hydra.callbacks.sweep_checks",
                  file=sys.stderr)
            raise SystemExit(1) from None
        if problem:  # SystemExit passes Hydra's report of errors, which would add a traceback; exit status 2
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)


class SweepFolder(Callback):
    started: str | None = None  # the sweep folder of the multirun this process launched
    job_pattern: str | None = None  # submitit's folder pattern of its jobs (`hydra.launcher.submitit_folder`), if any

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepFolder.started = str(config.hydra.sweep.dir)
        pattern = OmegaConf.select(config, "hydra.launcher.submitit_folder")
        SweepFolder.job_pattern = str(pattern) if pattern else None

    def on_multirun_end(self, config, **kwargs) -> None:
        SweepFolder.remove_empty_pattern_folder()

    @staticmethod
    def remove_empty_pattern_folder() -> None:
        """Remove the folder submitit names after its pattern itself (`.submitit/%j`), left empty, at a sweep's end or
        when Ctrl-C stops it."""
        if SweepFolder.job_pattern and "%j" in SweepFolder.job_pattern:
            folder = Path(SweepFolder.job_pattern)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _sweep_lines(config) -> list[str]:
    """The sweep's overrides, as Hydra's basic sweeper reads them: the config's `hydra.sweeper.params`, then the
    command line's, unresolved (an override's `${...}` is resolved in each job's config)."""
    params = OmegaConf.select(config, "hydra.sweeper.params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    return [f"{key}={value}" for key, value in params.items()] + OmegaConf.to_container(config.hydra.overrides.task,
                                                                                        resolve=False)


def _parsed(lines: list[str]) -> list[Override]:
    hydra = GlobalHydra.instance()
    return OverridesParser.create(config_loader=hydra.config_loader() if hydra.is_initialized() else None
                                  ).parse_overrides(lines)


def sweep_overrides(config) -> dict[str, Override]:
    """Each key the sweep sets, with its override, a key's last one winning (as Hydra's basic sweeper takes them)."""
    return {override.key_or_group: override for override in _parsed(_sweep_lines(config))}


def sweep_jobs(config) -> list[list[str]]:
    """The overrides of each job of the sweep: every combination of the swept values, expanded as Hydra's basic
    sweeper expands them (`BasicSweeper.split_arguments`): one list per key as written, `+` or `++` included, a later
    override of a key taking the earlier one's place. Within Hydra (`sadr-run`, or `sadr.conf.registry.sadr_configs()`),
    so that glob(*) lists a group; an interval(...) is refused before (`sweep_not_enumerable`)."""
    choices: dict[str, list[str]] = {}
    for override in _parsed(_sweep_lines(config)):
        key = override.get_key_element()
        choices[key] = ([f"{key}={value}" for value in override.sweep_string_iterator()]
                        if override.is_sweep_override() else [f"{key}={override.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*choices.values())]


def sweep_not_enumerable(config) -> str | None:
    """What is wrong when the sweep has an interval(...), which Hydra's basic sweeper cannot list (it would stop with
    a traceback, after a warning from these checks), or None. Overridden or not, Hydra refuses it."""
    for override in _parsed(_sweep_lines(config)):
        if override.is_sweep_override() and not override.is_discrete_sweep():
            key = override.get_key_element()
            return (f"{override.input_line}: Hydra's basic sweeper runs a list of values ({key}=a,b), range(...), "
                    f"choice(...) or glob(...), not interval(...), which only a sweeper that samples values (such as "
                    f"Optuna's) takes; give the values, e.g. {key}=range(0,1,0.25)")
    return None


def _within(path: str, key: str) -> bool:
    """Whether the dotted `path` is `key` or a setting inside it (`model.name` is within `model`)."""
    return path == key or path.startswith(f"{key}.")


def folder_varied_by_the_sweep(config) -> str | None:
    """What is wrong when the sweep folder's pattern refers to a key the sweep varies, or None."""
    pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
    referred = set(REFERENCE.findall(str(pattern)))
    folder_given = any(line.split("=", 1)[0].lstrip("+") == "hydra.sweep.dir" for line in config.hydra.overrides.hydra)
    for key, override in sweep_overrides(config).items():
        if not override.is_sweep_override():
            continue
        names = [path for path in referred if _within(path, key) or _within(key, path)]
        if names or (key == FOLDER_SETTING_GROUP and not folder_given):
            named_after = f"named after {', '.join(sorted(names))}" if names else f"set by each {key}"
            # an experiment's own sweep (hydra.sweeper.params) would not run in a sweep of experiments either
            fix = "" if key == FOLDER_SETTING_GROUP else ", or give the sweep one folder (hydra.sweep.dir=<folder>)"
            return (f"this sweep varies {key} ({override.input_line}), and its folder, hydra.sweep.dir={pattern}, is "
                    f"{named_after}: each value's jobs would write into a folder of their own, and the sweep's tables "
                    f"into one that holds none of them. Run one sweep per value{fix}")
    return None


def job_that_cannot_run(config) -> str | None:
    """What stops the first job of the sweep that does not compose or fails the run's checks, and how many do, or
    None. Composing takes about 0.1 s a job. A missing local file is left to the job: a cluster's job may see paths
    that the launching machine does not."""
    jobs = sweep_jobs(config)
    hydra_overrides = OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False)
    params = OmegaConf.select(config, "hydra.sweeper.params")
    try:
        sweep_folder = str(config.hydra.sweep.dir)  # before the jobs copy its `${now:...}` values
    except InterpolationResolutionError as err:  # `${hydra:...}`: Hydra's sweeper would stop with a traceback
        pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
        return (f"hydra.sweep.dir={pattern} cannot be resolved in the config that the sweep starts with, where Hydra "
                f"makes the sweep's folder ({str(err).splitlines()[0]}): give the sweep a folder such as "
                f"hydra.sweep.dir=<folder>")
    swept = [key for key, override in sweep_overrides(config).items() if override.is_sweep_override()]
    failing, folders = [], {}
    for number, job in enumerate(jobs):
        try:
            job_config = compose_config(hydra_overrides + job, checked=False, hydra=True)
        except Exception as err:  # noqa: BLE001 - Hydra's and OmegaConf's errors of a config that does not compose
            failing.append((job, missing_pair_setting(job) or misspelt_override(job) or f"{type(err).__name__}: {err}"))
            continue
        try:  # any other exception is a bug of these checks (SweepChecks)
            _check_no_sweep_of_its_own(job_config, params)
            with _as_launched(job_config, number, config):
                job_sweep_folder, folder = str(job_config.hydra.sweep.dir), str(job_config.hydra.sweep.subdir)
                _check_sweep_folder(job_sweep_folder, sweep_folder, job_config)
                first = folders.setdefault(folder, number)
                if first != number:
                    pattern = OmegaConf.to_container(job_config.hydra.sweep, resolve=False)["subdir"]
                    raise ConfigError(f"it would run in the folder of job {first} ({' '.join(jobs[first])}), {folder} "
                                      f"(hydra.sweep.subdir={pattern}), which holds one run: give each job a folder "
                                      f"of its own, e.g. hydra.sweep.subdir=${{hydra.job.num}} (the default)")
                _check_run_folder(job_config, os.path.join(job_sweep_folder, folder), swept)
            validate(job_config)
        except MissingInputError:
            continue
        except UsageError as err:
            failing.append((job, str(err)))
        except OmegaConfBaseException as err:  # a value of the job's that does not resolve
            failing.append((job, f"{type(err).__name__}: {err}"))
    if not failing:
        return None
    job, why = failing[0]
    return (f"{len(failing)} of the sweep's {len(jobs)} jobs cannot run, so none was started; the first: "
            f"{' '.join(job)}: {why}")


@contextmanager
def _as_launched(job_config, number: int, launching) -> Iterator[None]:
    """The job's config as Hydra's launchers set it before the job starts, within which its folders resolve as the
    job resolves them: `hydra.job.num` is the job's number, `hydra.job.id` one of its own, `${now:...}` the time the
    sweep started, and `${hydra:...}` reads the job's own hydra node. The launching config's is restored after."""
    with open_dict(job_config.hydra.job):
        job_config.hydra.job.num = number
        job_config.hydra.job.id = f"job{number}"
    OmegaConf.copy_cache(from_config=launching, to_config=job_config)
    hydra_config = HydraConfig.instance()
    launching_hydra = hydra_config.cfg
    hydra_config.set_config(job_config)
    try:
        yield
    finally:
        hydra_config.cfg = launching_hydra


def _check_run_folder(job_config, job_folder: str, swept: list[str]) -> None:
    """A sweep resumed in its folder finds each job's run by the job's folder (its number, by default): where the
    jobs are not those of the first launch (a value added in the middle, glob(*) listing a new editor), job n finds
    job m's run, and would refuse it only when it starts, after the jobs before it. Only a run that differs in a key
    the sweep varies (`swept`) is refused here: a difference in another key may come from where this check runs (a
    login node's environment, `cache_dir` from SADR_CACHE_DIR), which the job's own check sees as it is. Reads
    only; as Hydra's `run_job` sets the job's `hydra.runtime.output_dir`, which `output_dir` reads by default."""
    with read_write(job_config.hydra.runtime), open_dict(job_config.hydra.runtime):
        job_config.hydra.runtime.output_dir = os.path.abspath(job_folder)
    HydraConfig.instance().set_config(job_config)
    run = RunDirectory(job_config.output_dir, make=False)
    if not (run.path / CONFIG_FILE).is_file():  # before copying the job's config: a new sweep's folders hold none
        return
    task = copy.deepcopy(job_config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    held = run.held_run(task)
    if held and any(_within(differing, key) for differing in held.keys for key in swept):
        pattern = OmegaConf.to_container(job_config.hydra.sweep, resolve=False)["subdir"]
        raise ConfigError(f"its folder, {run.path}, holds a run of other settings (differs in: "
                          f"{'; '.join(held.differences)}), which the job would refuse only when it starts, after "
                          f"the jobs before it: this sweep's jobs are not those of the sweep that wrote the folder "
                          f"(each job's folder is hydra.sweep.subdir={pattern}), e.g. a value was added or removed, or "
                          f"glob(...) lists other options. Resume with the values of the first launch, in their order, "
                          f"or give this sweep another folder (hydra.sweep.dir=<folder>)")


def _check_sweep_folder(job_folder: str, sweep_folder: str, job_config) -> None:
    """A job's sweep folder is resolved in the job's config (Hydra's launchers compose each job anew), the sweep's
    tables go into the launching config's: a folder named after a swept key through another key or a resolver
    (`${hydra.runtime.choices.model}`), which `folder_varied_by_the_sweep` cannot read, differs between them."""
    if job_folder != sweep_folder:
        pattern = OmegaConf.to_container(job_config.hydra.sweep, resolve=False)["dir"]
        raise ConfigError(f"its run would be in the sweep folder {job_folder} (hydra.sweep.dir={pattern}), not in the "
                          f"sweep's, {sweep_folder}, where the sweep's tables are written: a value the sweep varies "
                          f"changes the folder. Give the sweep one folder (hydra.sweep.dir=<folder>)")


def _check_no_sweep_of_its_own(job_config, params) -> None:
    """A job whose config sweeps other values than the launching one (`experiment=sadr_comparison,table3_offline`: each
    experiment's `hydra.sweeper.params`) would be a single run: Hydra takes a sweep's values from the config that the
    sweep starts with, composed without the swept values."""
    own = OmegaConf.select(job_config, "hydra.sweeper.params")
    if own and own != params:
        swept = " ".join(f"{key}={value}" for key, value in own.items())
        raise ConfigError(f"its config sweeps {swept} (hydra.sweeper.params), which no job would run: Hydra takes a "
                          f"sweep's values from the config that the sweep starts with, so this job would be one run "
                          f"of them. Run one sweep per experiment (sadr-run -m experiment=<name>)")
