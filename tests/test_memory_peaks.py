"""GPU memory peaks per phase of a group (editing, evaluating): each phase's peak is read when it ends, and a row
records the group's peak and each phase's. A run's one-off work before its first group (scoring the unedited model;
the editor's templates and C's factors) is read apart, into environment.json. The CUDA counters are stood in for, so
this runs on the CPU."""
from __future__ import annotations

import gc
import json
import time
import weakref

import pytest
import torch

import sadr.models.devices as devices
from sadr.models.devices import PhasePeaks
from sadr.runner import Experiment
from tests.runs import composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)


class FakeCudaPeaks:
    """`take_peak_memory` on a card whose peaks since each reading are `peaks`, in order; records who read them."""

    def __init__(self, peaks: list[int]):
        self.peaks, self.read = list(peaks), 0

    def __call__(self, device: torch.device) -> dict:
        self.read += 1
        return {"cuda_peak_bytes": self.peaks.pop(0)}


def test_each_phase_has_the_peak_since_the_one_before_and_the_group_their_maximum(monkeypatch):
    monkeypatch.setattr(devices, "take_peak_memory", FakeCudaPeaks([7, 3]))
    peaks = PhasePeaks(torch.device("cuda"))
    peaks.end("edit")
    peaks.end("evaluate")
    assert peaks.fields() == {"cuda_peak_bytes": 7, "cuda_phase_peak_bytes": {"edit": 7, "evaluate": 3}}


def test_a_phase_read_on_cuda_is_described_for_the_log_and_one_never_read_is_not(monkeypatch):
    monkeypatch.setattr(devices, "take_peak_memory", FakeCudaPeaks([12_345_678_901]))
    peaks = PhasePeaks(torch.device("cuda"))
    peaks.end("prepare")
    assert peaks.described("prepare") == ", GPU peak 12.3 GB"
    assert peaks.described("edit") == ""


def test_off_cuda_a_group_records_no_peak():
    peaks = PhasePeaks(torch.device("cpu"))
    peaks.end("edit")
    peaks.end("evaluate")
    assert peaks.fields() == {}


ONE_GROUP = [{"edit": 10, "evaluate": 20}] * 2


@pytest.mark.parametrize("extra, expected", [
    ((), [{"edit": 10, "evaluate": 20}, {"edit": 30, "evaluate": 5}]),  # a group per case
    (("editor.parallel_cases=2",), ONE_GROUP),  # the two cases side by side
    (("editor.protocol=sequential",), ONE_GROUP),  # every case edited, then every case evaluated
], ids=["one at a time", "side by side", "sequential"])
def test_rows_record_the_peaks_of_editing_and_of_evaluating_their_group(extra, expected, tiny_dir, tmp_path,
                                                                        monkeypatch):
    fake = FakeCudaPeaks([40, 50, 10, 20, 30, 5])
    monkeypatch.setattr(devices, "take_peak_memory", fake)
    out = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", *extra))).run()
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [row["cuda_phase_peak_bytes"] for row in rows] == expected
    assert [row["cuda_peak_bytes"] for row in rows] == [max(phases.values()) for phases in expected]
    groups = len(expected) if expected is not ONE_GROUP else 1
    assert fake.read == 2 + 2 * groups  # the two one-off phases, then an edit and an evaluation per group
    environment = json.loads((out / "environment.json").read_text())
    assert environment["one_off_cuda_peak_bytes"] == {"score_unedited": 40, "prepare": 50}
    assert environment["n_cases"] == 2  # the record written at the start, kept


def test_a_run_off_cuda_records_no_one_off_peak(tiny_dir, tmp_path):
    out = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run"))).run()
    assert "one_off_cuda_peak_bytes" not in json.loads((out / "environment.json").read_text())


class FakeCudaCounters:
    """torch.cuda's peak counter on a card: `allocate` raises the peak, a reset drops it to what is held now (0 here)."""

    def __init__(self, monkeypatch):
        self.peak, self.calls = 0, []
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self.max_memory_allocated)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset_peak_memory_stats)

    def allocate(self, size: int) -> None:
        self.peak = max(self.peak, size)

    def max_memory_allocated(self, device) -> int:
        self.calls.append(("read", device))
        return self.peak

    def reset_peak_memory_stats(self, device) -> None:
        self.calls.append(("reset", device))
        self.peak = 0


def test_a_reading_gives_the_peak_since_the_reading_before_and_off_cuda_nothing(monkeypatch):
    """100 bytes at most before the first reading and 40 before the second: the second reads 40, not 100."""
    counters, cuda = FakeCudaCounters(monkeypatch), torch.device("cuda", 1)
    counters.allocate(100)
    assert devices.take_peak_memory(cuda) == {"cuda_peak_bytes": 100}
    counters.allocate(40)
    assert devices.take_peak_memory(cuda) == {"cuda_peak_bytes": 40}
    assert counters.calls == [("read", cuda), ("reset", cuda)] * 2
    for device in (torch.device("cpu"), torch.device("mps")):
        assert devices.take_peak_memory(device) == {}
        devices.reset_peak_memory(device)
    assert len(counters.calls) == 4  # no CUDA counter touched for the CPU or MPS


def test_a_reset_starts_the_next_peak_afresh_on_cuda(monkeypatch):
    counters, cuda = FakeCudaCounters(monkeypatch), torch.device("cuda")
    counters.allocate(100)
    devices.reset_peak_memory(cuda)
    counters.allocate(30)
    assert counters.calls == [("reset", cuda)]
    peaks = PhasePeaks(cuda)
    peaks.end("edit")
    assert peaks.fields() == {"cuda_peak_bytes": 30, "cuda_phase_peak_bytes": {"edit": 30}}


@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_a_finished_run_leaves_nothing_of_its_own_alive_for_the_next_job_in_the_process(editor, tiny_dir, tmp_path):
    """The jobs of a basic-launcher sweep (and scale_bench's runs) share one process: C's factors (2.1 GB per GPT-J
    layer on the GPU), the statistics and the experiment of a run must go with it."""
    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", f"editor={editor}", "dataset.limit=1")))
    experiment.run()
    alive = [weakref.ref(experiment), weakref.ref(experiment.statistics),
             weakref.ref(experiment.statistics.factorized([1])[1])]  # made by the run, and kept by its statistics
    del experiment
    gc.collect()
    assert [ref() for ref in alive] == [None, None, None]


def test_releasing_memory_collects_unreferenced_cycles_and_empties_the_cuda_cache_where_there_is_one(monkeypatch):
    class Node:
        pass

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    was_enabled = gc.isenabled()
    gc.disable()  # only release_unused_memory collects
    try:
        for available in (True, False):
            monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
            node = Node()
            node.itself = node
            gone = weakref.ref(node)
            del node
            devices.release_unused_memory()
            assert gone() is None
    finally:
        if was_enabled:
            gc.enable()
    assert emptied == [True]  # with CUDA only


def test_the_clock_waits_for_the_cuda_device_s_queued_work(monkeypatch):
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: synchronized.append(device))
    before = time.perf_counter()
    assert before <= devices.clock(torch.device("cuda", 2)) <= time.perf_counter()
    devices.clock(torch.device("cpu"))
    assert synchronized == [torch.device("cuda", 2)]


@pytest.mark.parametrize("protocol, batch_size", [("batch", 2), ("sequential", 1)])
def test_no_update_or_checkpointed_state_of_an_edit_is_held_while_its_cases_are_evaluated(protocol, batch_size,
                                                                                          tiny_dir, tmp_path,
                                                                                          monkeypatch):
    """An edit's updates (float64 factors) and MEMIT's keys, already written into the model, and the editor states a
    sequential run checkpoints, already on disk, are not needed to evaluate: for a batch of 10,000 requests on GPT-J
    they take GBs of its device. Only the unedited state, the first taken, stays."""
    from sadr.editors.spread import SpreadEditor

    apply, state_dict, evaluate = SpreadEditor.apply, SpreadEditor.state_dict, Experiment._evaluate
    made, states, alive = [], [], []

    def recorded_apply(self, requests):
        outcome = apply(self, requests)
        made.extend(weakref.ref(factor) for update in outcome.updates.values()
                    for factor in (update.left, update.right))
        made.extend(weakref.ref(solve.keys) for solve in outcome.solves)
        return outcome

    def recorded_state_dict(self):
        state = state_dict(self)
        states.append([weakref.ref(weight) for weight in state["weights"].values()])
        return state

    def checked_evaluate(self, cases):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made + [ref for later in states[1:] for ref in later]))
        return evaluate(self, cases)

    monkeypatch.setattr(SpreadEditor, "apply", recorded_apply)
    monkeypatch.setattr(SpreadEditor, "state_dict", recorded_state_dict)
    monkeypatch.setattr(Experiment, "_evaluate", checked_evaluate)
    Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor=memit", f"editor.protocol={protocol}",
                                       f"editor.batch_size={batch_size}"))).run()
    assert len(made) == 3 * (2 // batch_size) and len(states) == 1 + (protocol == "sequential") * 2
    assert alive == [0]


def test_a_resumed_sequential_run_holds_no_copy_of_the_editor_state_it_read_back(tiny_dir, tmp_path, monkeypatch):
    """Killed at its second edit, a sequential run resumes from its checkpoint: the editor state read back (a copy
    of every edited layer's weights, GBs on GPT-J) is copied into the model and not kept while the run edits on and
    evaluates."""
    from sadr import runner
    from sadr.editors.spread import SpreadEditor

    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor=memit", "editor.protocol=sequential",
                                  "editor.batch_size=1"))
    apply, read, evaluate = SpreadEditor.apply, runner._read_checkpoint, Experiment._evaluate
    applied, read_back, alive = [], [], []

    def killed_at_the_second_edit(self, requests):
        if applied:
            raise KeyboardInterrupt
        applied.append(requests)
        return apply(self, requests)

    def recorded_read(state_file):
        state = read(state_file)
        read_back.extend(weakref.ref(weight) for weight in state["editor"]["weights"].values())
        return state

    def checked_evaluate(self, cases):
        gc.collect()
        alive.append(sum(ref() is not None for ref in read_back))
        return evaluate(self, cases)

    monkeypatch.setattr(SpreadEditor, "apply", killed_at_the_second_edit)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(cfg)
    monkeypatch.setattr(SpreadEditor, "apply", apply)
    monkeypatch.setattr(runner, "_read_checkpoint", recorded_read)
    monkeypatch.setattr(Experiment, "_evaluate", checked_evaluate)
    runner.run_experiment(cfg)
    assert len(read_back) == len(cfg.editor.layers) and alive == [0]
