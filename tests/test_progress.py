"""Progress over cases: a bar on a terminal, periodic log lines elsewhere, one line per case when asked."""
from __future__ import annotations

import logging

from sadr.progress import Progress
from sadr.runner import case_line, run_experiment
from tests.runs import composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)


def test_without_a_terminal_progress_is_a_log_line_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="sadr.progress")
    with Progress(4, True, interval=3600, interactive=False) as progress:
        progress.advance(1)  # within the interval: no line
        assert not caplog.records
        progress.advance(3)  # the last case always reports
    assert len(caplog.records) == 1
    assert "4/4" in caplog.records[0].getMessage() and "case/s" in caplog.records[0].getMessage()


def test_on_a_terminal_progress_is_a_bar_on_stderr(capsys):
    with Progress(4, True, interactive=True) as progress:
        progress.advance(2)
    captured = capsys.readouterr()
    assert "2/4" in captured.err and captured.out == ""


def test_progress_can_be_switched_off(caplog, capsys):
    caplog.set_level(logging.INFO)
    with Progress(2, False, interval=0, interactive=False) as progress:
        progress.advance(2)
    assert not caplog.records and capsys.readouterr().err == ""


def test_a_case_line_shows_each_metric_x100_and_the_seconds():
    row = {"case_id": 7, "subject": "Tokyo", "seconds": {"v_star": 2.5, "eval_per_case": 0.5},
           "edited": {"efficacy": {"value": [1.0]}, "paraphrase": {"value": [1.0, 0.0]}, "subject_attention": {"value": []},
                      "drift_max": {"value": [0.2]}}}
    assert case_line(row) == "case 7 (Tokyo): ES 100 PS 50 Drift 20; 3.0 s"


def test_case_lines_are_info_only_when_asked(tiny_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sadr.runner")
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "quiet", "dataset.limit=1")))
    assert not [r for r in caplog.records if r.getMessage().startswith("case 0 (")]
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "told", "dataset.limit=1", "progress.case_lines=true")))
    assert [r for r in caplog.records if r.getMessage().startswith("case 0 (") and " ES " in r.getMessage()]
