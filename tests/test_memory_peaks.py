"""GPU memory peaks per phase of a group (editing, evaluating): each phase's peak is read when it ends, and a row
records the group's peak and each phase's. The CUDA counters are stood in for, so this runs on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

import sadr.models.devices as devices
from sadr.models.devices import GroupPeaks
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
    peaks = GroupPeaks(torch.device("cuda"))
    peaks.end("edit")
    peaks.end("evaluate")
    assert peaks.fields() == {"cuda_peak_bytes": 7, "cuda_phase_peak_bytes": {"edit": 7, "evaluate": 3}}


def test_off_cuda_a_group_records_no_peak():
    peaks = GroupPeaks(torch.device("cpu"))
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
    fake = FakeCudaPeaks([10, 20, 30, 5])
    monkeypatch.setattr(devices, "take_peak_memory", fake)
    out = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", *extra))).run()
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [row["cuda_phase_peak_bytes"] for row in rows] == expected
    assert [row["cuda_peak_bytes"] for row in rows] == [max(phases.values()) for phases in expected]
    assert fake.read == 2 * (len(expected) if expected is not ONE_GROUP else 1)  # an edit and an evaluation per group
