"""Sweeps beyond one process: the submitit launcher (the code path of SLURM) and one GPU per parallel job."""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from filelock import FileLock

from sadr.cli.sweep import SweepFolder
from sadr.conf.registry import compose_config
from sadr.evaluation.summary import summarize
from sadr.models import devices
from tests.runs import OFFLINE_RECORDS, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)


def _claim_and_hold(lock_dir, count, report):
    report.write_text(str(devices.claim_free_gpu(lock_dir, count, poll_seconds=0.05)))
    time.sleep(600)  # holds the GPU until killed


def _reported(path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.05)
    return int(path.read_text())


def test_parallel_jobs_each_claim_a_gpu_of_their_own_and_wait_when_all_are_taken(tmp_path):
    context = multiprocessing.get_context("fork")
    jobs = [context.Process(target=_claim_and_hold, args=(tmp_path / "gpus", 2, tmp_path / f"job{i}")) for i in range(3)]
    try:
        jobs[0].start()
        jobs[1].start()
        assert sorted(_reported(tmp_path / f"job{i}") for i in range(2)) == [0, 1]
        jobs[2].start()
        time.sleep(1.0)
        assert not (tmp_path / "job2").exists()  # both GPUs are held: the third job waits
        first = _reported(tmp_path / "job0")
        jobs[0].kill()  # a job that dies releases its GPU
        assert _reported(tmp_path / "job2") == first
    finally:
        for job in jobs:
            if job.pid is not None:
                job.kill()
                job.join(30)


def test_auto_takes_a_free_gpu_when_several_are_visible(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(devices, "_HELD", {})
    assert devices.resolve_device("auto", tmp_path) == torch.device("cuda", 0)
    assert devices.resolve_device("auto", tmp_path) == torch.device("cuda", 0)  # one GPU per process, kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("auto", tmp_path / "single") == torch.device("cuda")


@pytest.mark.parametrize("visible, workers", [(0, 1), (1, 1), (3, 3)])
def test_the_gpus_launcher_starts_one_worker_per_visible_gpu_and_one_without_any(visible, workers, monkeypatch, caplog):
    """joblib refuses n_jobs=0, so a machine without a GPU still gets one worker, and a warning says so."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    with caplog.at_level(logging.WARNING, logger="sadr.conf.registry"):
        assert compose_config(["hydra/launcher=gpus"], checked=False, hydra=True).hydra.launcher.n_jobs == workers
    assert ("no GPU is visible, so the jobs run one at a time on the CPU" in caplog.text) == (visible == 0)


@pytest.mark.parametrize("launcher", ["local", "gpus"])
def test_a_sharded_sweep_through_a_launcher_merges_into_the_unsharded_table(tiny_dir, tmp_path, launcher):  # noqa: F811
    """2 configurations × 2 shards as 4 parallel jobs (submitit's local executor, or joblib workers), merged by
    `sadr summarize`, equal the same 2 configurations run unsharded in this process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*tiny_overrides(tiny_dir, tmp_path / "unused"), f"cache_dir={tmp_path / 'cache'}"]
    common = [o for o in common if not o.startswith("output_dir=")]
    sweep = subprocess.run([sys.executable, "-m", "sadr.cli.run", "-m", f"hydra/launcher={launcher}", *common,
                            "sadr.lambda=0,0.5", "dataset.shard=1/2,2/2", f"hydra.sweep.dir={tmp_path / 'sharded'}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    jobs = {path.name for path in (tmp_path / "sharded" / ".submitit").glob("*")}
    assert len(jobs) == (4 if launcher == "local" else 0) and "%j" not in jobs  # not submitit's empty pattern folder
    whole = subprocess.run([sys.executable, "-m", "sadr.cli.run", "-m", *common, "sadr.lambda=0,0.5",
                            f"hydra.sweep.dir={tmp_path / 'whole'}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    sharded, unsharded = summarize(tmp_path / "sharded"), summarize(tmp_path / "whole")
    assert set(sharded.loc[sharded.state == "edited", "shards"]) == {"2/2"}
    metrics = [c for c in unsharded.columns if c.split(" ")[0] in ("ES", "PS", "NS", "DNS")]
    key = lambda t: t[t.state == "edited"].sort_values("sadr.lambda")[["sadr.lambda", "n_cases", *metrics]].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(key(sharded), key(unsharded))


def test_auto_with_two_gpus_takes_one_of_its_own(monkeypatch, tmp_path):
    """Two visible GPUs are several: a parallel job must hold an index, not share the bare `cuda` (cuda:0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(devices, "_HELD", {})
    assert devices.resolve_device("auto", tmp_path) == torch.device("cuda", 0)


def test_a_job_waiting_for_a_gpu_polls_and_says_so_once(monkeypatch, tmp_path, caplog):
    """The only GPU is held by another job (a lock of its own) for three polls, then freed: it is taken, and the wait
    is logged once, not at every poll."""
    monkeypatch.setattr(devices, "_HELD", {})
    other = FileLock(str(tmp_path / "cuda0.lock"))
    other.acquire()
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        if len(slept) == 3:
            other.release()

    monkeypatch.setattr(devices.time, "sleep", sleep)
    with caplog.at_level(logging.INFO, logger="sadr.models.devices"):
        assert devices.claim_free_gpu(tmp_path, 1, poll_seconds=0.25) == 0
    assert slept == [0.25] * 3
    assert caplog.text.count("all 1 GPUs are held by other sadr jobs; waiting for one") == 1


def test_ctrl_c_in_a_local_sweep_ends_with_one_line_last_and_a_rerun_finishes_it(tiny_dir, tmp_path):  # noqa: F811
    """A terminal's Ctrl-C reaches the whole process group: the submitit jobs stop, each keeping its finished cases
    (their logs say so), and the launching process ends with exit status 130 and, as its last line, the folder to
    resume from (named by the time, as by default, so read from the sweep's own config). The rerun finishes the
    sweep, with its tables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*(o for o in tiny_overrides(tiny_dir, tmp_path / "unused")
                if not o.startswith(("output_dir=", "dataset.path=", "dataset.limit="))),
              f"dataset.path={OFFLINE_RECORDS}", "dataset.limit=8"]
    command = [sys.executable, "-m", "sadr.cli.run", "-m", "hydra/launcher=local", *common, "sadr.lambda=0,0.5",
               f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}/${{now:%H-%M-%S}}"]
    launch = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True,  # a group of its own, as a terminal's foreground job
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not list(tmp_path.glob("sweep/*/0/cases.jsonl")):  # a case finished: both jobs are editing
            assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()
            time.sleep(0.1)
        os.killpg(launch.pid, signal.SIGINT)
        stdout, stderr = launch.communicate(timeout=120)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    (sweep,) = tmp_path.glob("sweep/*")
    assert launch.returncode == 130, stderr[-3000:]
    assert stderr.splitlines()[-1] == (
        "interrupted: jobs on this machine (hydra/launcher=local or gpus) got the interrupt too and stop, each keeping "
        "its finished cases; SLURM jobs go on (squeue lists them). To resume (finished work is skipped) and write the "
        f"sweep's tables, run the same command with hydra.sweep.dir={sweep}")
    logs = [path.read_text() for path in sweep.glob(".submitit/*/*_log.err")]
    deltas = "the δs optimised so far in the edit in progress"  # kept where the signal came after a δ
    said = rf"^interrupted: (\d+ finished case\(s\)|{deltas})( and {deltas})? are kept in "
    assert any(re.search(said, log, re.M) for log in logs), logs
    assert not (sweep / "summary.csv").exists()
    assert "%j" not in {path.name for path in (sweep / ".submitit").iterdir()}  # submitit's empty pattern folder
    command[-1] = f"hydra.sweep.dir={sweep}"
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    first = {path.parent for path in sweep.glob(".submitit/*/*_log.err") if path.read_text() in logs}
    rerun_logs = "".join(path.read_text() for path in sweep.glob(".submitit/*/*_log.out") if path.parent not in first)
    assert re.search(r"\([1-9]\d* already finished in ", rerun_logs), rerun_logs  # what the jobs kept is not redone
    assert set(summarize(sweep).loc[lambda t: t.state == "edited", "n_cases"]) == {8}


def test_only_submitit_s_empty_pattern_folder_is_removed(tmp_path, monkeypatch):
    """The folder submitit names after its pattern (`%j`) goes at a sweep's end only while empty; a job's own folder,
    or a pattern folder that holds a file, stays."""
    pattern = tmp_path / ".submitit" / "%j"
    pattern.mkdir(parents=True)
    monkeypatch.setattr(SweepFolder, "job_pattern", str(pattern))
    (pattern / "kept.out").write_text("log")
    SweepFolder.remove_empty_pattern_folder()
    assert (pattern / "kept.out").is_file()
    (pattern / "kept.out").unlink()
    SweepFolder.remove_empty_pattern_folder()
    assert not pattern.exists()
    job = tmp_path / ".submitit" / "123"
    job.mkdir()
    monkeypatch.setattr(SweepFolder, "job_pattern", str(job))
    SweepFolder.remove_empty_pattern_folder()
    assert job.is_dir()
