"""`sadr-run`: compose the Hydra config and run one experiment (or a sweep with -m).

A user's mistake (a bad key or value, a missing file, an unknown model family, a malformed record, no
network for a hub model) ends the command with its message on stderr and exit status 2, without a
traceback; `HYDRA_FULL_ERROR=1` shows the traceback. Ctrl-C ends it with one line saying how many finished cases
are kept and how to resume, and exit status 130; SIGTERM (a SLURM job's time limit, `kill`, `timeout`) does the same
with exit status 143. Anything else is a bug and keeps its traceback. The line, or the
traceback, is also the last record of the run's log file (Hydra's `run.log`), which is often all a SLURM job leaves.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sadr.cache import writable_dir
from sadr.cli.sweep import SweepChecks, SweepFolder
from sadr.conf.advice import missing_pair_setting, misspelt_override
from sadr.conf.registry import register_configs
from sadr.conf.validation import validate
from sadr.errors import DamagedFileError, DeviceMemoryError, UsageError
from sadr.interrupts import Terminated, further_interrupts_ignored, sigterm_stops_the_run
from sadr.results import RunDirectory

log = logging.getLogger("sadr")


class _Stage:
    """Whether Hydra got as far as calling the task: an exit before that is a config that does not compose."""

    task_started = False


def run_experiment(cfg: DictConfig) -> None:
    """The run (`sadr.runner`'s), imported once the config composes: the runner's imports take seconds (a mistyped
    key was reported after 6.1 s with them, 3.6 s without, on 2 CPU cores), which a mistake, `--help` or `--cfg` need
    not wait for."""
    from sadr.runner import run_experiment as run

    run(cfg)


def _full_error_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    _Stage.task_started = True
    try:
        with sigterm_stops_the_run():
            validate(cfg)
            run_experiment(cfg)
    except UsageError as err:
        if _full_error_requested():
            raise
        log.debug("stopped by a usage error", exc_info=True)
        kept = _kept(cfg.output_dir) if isinstance(err, DeviceMemoryError) else ""  # a run stopped midway
        resume = f"; {kept} are kept in {cfg.output_dir}: a rerun with {_where_to_resume(cfg.output_dir)} skips them"
        _say_why_it_stopped(f"error: {err}{resume if kept else ''}")
        raise SystemExit(2) from None
    except KeyboardInterrupt as stop:
        if _full_error_requested():
            raise
        terminated = isinstance(stop, Terminated)
        with further_interrupts_ignored():  # counting the kept rows of a large run takes seconds
            _say_why_it_stopped(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: "
                                f"{_kept(cfg.output_dir) or '0 finished case(s)'} are kept in {cfg.output_dir}; to "
                                "resume (finished work is skipped), run the same command with "
                                f"{_where_to_resume(cfg.output_dir)}")
        raise SystemExit(143 if terminated else 130) from None
    except Exception:
        _record_in_log_file("stopped by an error (a bug: please report it with this traceback)", sys.exc_info())
        raise


def _say_why_it_stopped(line: str) -> None:
    print(line, file=sys.stderr)
    _record_in_log_file(line)


def _record_in_log_file(message: str, exc_info=None) -> None:
    """Writes a record to the log files alone: the terminal gets the message once, on stderr (or from Hydra)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _kept(output_dir: str) -> str:
    """What a stopped run leaves in its directory for a rerun to skip ('' when nothing)."""
    run = RunDirectory(output_dir)
    try:
        rows, checkpointed = run.count(), run.checkpointed()
    except DamagedFileError as err:  # while reporting another stop: say so, without hiding that stop
        return f"the cases in it (not counted: {err})"
    # a sequential run evaluates its cases only once every request is edited, and a group's rows come after all of
    # its δs: "0 cases" alone would read as if the hours before were lost
    kept = [f"{rows} finished case(s)"] if rows else []
    kept += ["the sequential edits checkpointed so far"] if checkpointed else []
    kept += ["the δs optimised so far in the edit in progress"] if run.deltas_kept() else []
    return " and ".join(kept)


def _where_to_resume(output_dir: str) -> str:
    """The override that points a new invocation at this run's directory (a sweep's, in a multirun)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"hydra.sweep.dir={hydra_cfg.sweep.dir}"
    return f"hydra.run.dir={output_dir}"


def _wait_for_child_processes(timeout: float) -> None:
    """Submitit's controllers of local jobs, this process's children, print a traceback each when Ctrl-C reaches them:
    once they are gone, the line that says what to do comes last. Gives up after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:  # children, none finished yet
                time.sleep(0.05)
        except ChildProcessError:  # no child left
            return


def _what_an_interrupted_launch_keeps() -> str:
    if SweepFolder.started is None:
        return "before the run started; nothing was computed"
    return ("jobs on this machine (hydra/launcher=local or gpus) got the interrupt too and stop, each keeping its "
            "finished cases; SLURM jobs go on (squeue lists them). To resume (finished work is skipped) and write the "
            f"sweep's tables, run the same command with hydra.sweep.dir={SweepFolder.started}")


# overrides of the folders Hydra makes before the run starts; what Hydra says when it cannot is a traceback
HYDRA_FOLDERS = ("hydra.run.dir", "hydra.sweep.dir")
NO_FOLDER_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


def _check_hydra_folders(argv: list[str]) -> None:
    """A run or sweep folder given on the command line is made (as Hydra would) and written to, or the error names it."""
    if NO_FOLDER_FLAGS.intersection(argv):
        return
    for arg in argv:
        key, given, value = arg.partition("=")
        if given and key.lstrip("+~") in HYDRA_FOLDERS and "${" not in value:
            writable_dir(value, key.lstrip("+~"))


def main() -> None:
    try:
        register_configs()  # an installed editor's settings files are checked here
        _check_hydra_folders(sys.argv[1:])
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        _main()
    except SystemExit as stop:
        # Hydra prints a config that does not compose (unknown key, bad value, missing config file) without a
        # traceback and exits with 1; that is a usage error like the ones the task reports.
        if stop.code == 1 and not _Stage.task_started and not SweepChecks.stopped_on_a_bug:
            # Hydra's message for a misspelt key advises '+', which would add a key that nothing reads
            what_to_do = misspelt_override(sys.argv[1:]) or missing_pair_setting(sys.argv[1:])
            if what_to_do:
                print(f"error: {what_to_do}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        # outside a job's handler (_main's): the launching process of a sweep whose jobs run in processes of their own
        if _full_error_requested():
            raise
        with further_interrupts_ignored():
            _wait_for_child_processes(timeout=10.0)
            SweepFolder.remove_empty_pattern_folder()
            print(f"interrupted: {_what_an_interrupted_launch_keeps()}", file=sys.stderr)
        raise SystemExit(130) from None
    except ValueError as err:
        # Hydra's own check of the command line (e.g. "Only one of --run, --multirun, --cfg ... can be specified")
        if _Stage.task_started or _full_error_requested():
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
