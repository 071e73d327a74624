"""Progress over cases: a bar on a terminal, periodic log lines elsewhere, one line per case when asked."""
from __future__ import annotations

import logging
import sys

from sadr import progress as progress_module
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


def test_log_lines_come_once_per_interval_and_show_the_time_since_the_start(caplog, monkeypatch):
    """On a clock set by hand: 60 s between lines, each with the elapsed time of the whole run, not of the interval."""
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="sadr.progress")
    with Progress(10, True, interval=60, interactive=False) as progress:
        for seconds in (30, 61, 90, 121):
            clock[0] = seconds
            progress.advance(1)
    lines = [r.getMessage() for r in caplog.records]
    # at 61 s and at 121 s, each 60 s or more after the line before; 61 s / 2 cases = 30.5 s a case, 8 left: 244 s;
    # 121 s / 4 = 30.25 s, 6 left: 181.5 s
    assert lines == ["progress:  20% 2/10 [01:01<04:04, 30.50s/case]", "progress:  40% 4/10 [02:01<03:01, 30.25s/case]"]


def test_items_done_before_count_as_done_but_not_in_the_rate(caplog, monkeypatch, capsys):
    """A resumed statistics pass: 4 of 10 texts were read by the killed process, the next one takes 2 s here."""
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="sadr.progress")
    with Progress(10, True, interval=0, interactive=False, unit="text", initial=4) as progress:
        clock[0] = 2.0
        progress.advance(1)
    # 1 text in 2 s, 5 left: 10 s (counting the 4 earlier texts in the rate would say 0.40 s a text, 2 s left)
    assert [r.getMessage() for r in caplog.records] == ["progress:  50% 5/10 [00:02<00:10,  2.00s/text]"]
    with Progress(10, True, interactive=True, initial=4) as progress:
        progress.advance(1)
    assert "5/10" in capsys.readouterr().err


def test_an_unknown_total_shows_no_progress(caplog, capsys):
    """A statistics pass whose number of texts is unknown passes 0: no bar, and no log line at every text."""
    caplog.set_level(logging.INFO, logger="sadr.progress")
    for interactive in (False, True):
        with Progress(0, True, interval=0, interactive=interactive, unit="text") as progress:
            progress.advance(1)
            progress.advance(1)
    assert not caplog.records and capsys.readouterr().err == ""


def test_the_bar_is_shown_when_stderr_is_a_terminal_whatever_stdout_is(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert Progress(4, True).interactive
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert not Progress(4, True).interactive


def test_console_log_lines_go_through_the_bar_while_it_is_shown(monkeypatch):
    """A handler writing to stderr would break the bar's line: the bar's own handler replaces it, then gives it back."""
    console = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(logging.root, "handlers", [console])
    with Progress(4, True, interactive=True):
        assert console not in logging.root.handlers and len(logging.root.handlers) == 1
    assert logging.root.handlers == [console]


def test_a_case_line_shows_each_metric_x100_and_the_seconds():
    row = {"case_id": 7, "subject": "Tokyo", "seconds": {"v_star": 2.5, "eval_per_case": 0.5},
           "edited": {"efficacy": {"value": [1.0]}, "paraphrase": {"value": [1.0, 0.0]}, "subject_attention": {"value": []},
                      "drift_max": {"value": [0.2]}, "neighborhood": {"value": []}}}  # NS without a prompt: no score
    assert case_line(row) == "case 7 (Tokyo): ES 100 PS 50 Drift 20; 3.0 s"


def test_case_lines_are_info_only_when_asked(tiny_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sadr.runner")
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "quiet", "dataset.limit=1")))
    assert not [r for r in caplog.records if r.getMessage().startswith("case 0 (")]
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "told", "dataset.limit=1", "progress.case_lines=true")))
    assert [r for r in caplog.records if r.getMessage().startswith("case 0 (") and " ES " in r.getMessage()]
