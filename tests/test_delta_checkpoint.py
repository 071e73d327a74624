"""The finished δs of the group being edited are kept in the run directory: a run stopped while it optimises a batch's
δs resumes from them, with the rows of a run never stopped."""
from __future__ import annotations

import pytest
import torch

import sadr.editors.delta as delta
from sadr.cache import TORCH, read_entry, write_atomically
from sadr.editors.delta_checkpoint import FORMAT, discard_deltas, kept_or_optimised, resumable_deltas, timed_deltas
from sadr.results import DELTA_CHECKPOINT
from sadr.runner import SEQUENTIAL_STATE, run_experiment
from tests.runs import OFFLINE_RECORDS, composed, tiny_dir, tiny_overrides, written_rows  # noqa: F401 (a fixture)


class Optimiser:
    """Stands in for a δ-optimisation: a request's result is its name and how many times it was optimised;
    `stop_at` raises Ctrl-C instead on that call. Each call takes 5 s of a stand-in `clock`, where one is given."""

    def __init__(self, stop_at: int | None = None, clock: list[float] | None = None):
        self.calls: list[str] = []
        self.stop_at = stop_at
        self.clock = clock

    def __call__(self, request: str) -> dict:
        def optimise():
            self.calls.append(request)
            if self.clock is not None:
                self.clock[0] += 5.0
            if len(self.calls) == self.stop_at:
                raise KeyboardInterrupt
            return {"request": request, "delta": torch.full((2,), float(len(self.calls)))}

        return kept_or_optimised(request, optimise, encode=lambda r: r, decode=lambda r: {**r, "read_back": True})


def test_a_stopped_block_keeps_its_finished_results_and_the_next_reads_them_back_in_order(tmp_path):
    folder, identity = tmp_path / DELTA_CHECKPOINT, {"group": [0, 1, 2]}
    first = Optimiser(stop_at=3)
    with pytest.raises(KeyboardInterrupt), resumable_deltas(folder, identity, every_seconds=3600):
        [first(request) for request in "abc"]
    assert first.calls == ["a", "b", "c"] and len(list(folder.glob("*.pt"))) == 1  # written as the block was left
    second = Optimiser()
    with resumable_deltas(folder, identity):
        results = [second(request) for request in "abc"]
    assert second.calls == ["c"]
    assert [(r["request"], r.get("read_back", False), r["delta"].tolist()) for r in results] == [
        ("a", True, [1.0, 1.0]), ("b", True, [2.0, 2.0]), ("c", False, [1.0, 1.0])]
    third = Optimiser()
    with resumable_deltas(folder, identity):
        [third(request) for request in "abc"]
    assert third.calls == []  # every result kept, across two chunk files
    discard_deltas(folder)
    assert not folder.exists()


def test_a_second_ctrl_c_while_a_stopped_block_saves_its_results_comes_after_the_save(tmp_path, monkeypatch):
    """`timeout -s INT` signals the process, then its group; an impatient user presses Ctrl-C again."""
    import os
    import signal

    from sadr.editors import delta_checkpoint

    def save_interrupted(value, path, fmt):
        os.kill(os.getpid(), signal.SIGINT)
        write_atomically(value, path, fmt)

    monkeypatch.setattr(delta_checkpoint, "write_atomically", save_interrupted)
    folder = tmp_path / DELTA_CHECKPOINT
    with pytest.raises(KeyboardInterrupt), resumable_deltas(folder, {"group": [0, 1]}, every_seconds=3600):
        Optimiser(stop_at=2)("a"), Optimiser(stop_at=1)("b")
    monkeypatch.undo()
    again = Optimiser()
    with resumable_deltas(folder, {"group": [0, 1]}):
        again("a"), again("b")
    assert again.calls == ["b"]  # a's result was written whole


def test_results_of_another_group_or_another_request_are_not_read_back(tmp_path):
    folder = tmp_path / DELTA_CHECKPOINT
    with resumable_deltas(folder, {"group": [0, 1]}):
        [Optimiser()(request) for request in "ab"]
    other_group = Optimiser()
    with resumable_deltas(folder, {"group": [2, 3]}):
        [other_group(request) for request in "ab"]
    assert other_group.calls == ["a", "b"]
    other_request = Optimiser()
    with resumable_deltas(folder, {"group": [2, 3]}):
        [other_request(request) for request in "axb"]
    assert other_request.calls == ["x", "b"]  # "a" read back; from the first request that differs on, afresh
    again = Optimiser()
    with resumable_deltas(folder, {"group": [2, 3]}):
        [again(request) for request in "axb"]
    assert again.calls == []


def test_a_damaged_chunk_and_those_after_it_are_optimised_again(tmp_path, caplog):
    """A chunk a result each (written at once); the second damaged (a changed byte, caught by its CRC-32): the
    first is read back, the second and the third are optimised again."""
    folder, identity = tmp_path / DELTA_CHECKPOINT, {"group": [0, 1, 2]}
    with resumable_deltas(folder, identity, every_seconds=0):
        [Optimiser()(request) for request in "abc"]
    chunks = sorted(folder.glob("*.pt"))
    assert len(chunks) == 3
    damaged = bytearray(chunks[1].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunks[1].write_bytes(bytes(damaged))
    again = Optimiser()
    with resumable_deltas(folder, identity):
        [again(request) for request in "abc"]
    assert again.calls == ["b", "c"] and "is damaged" in caplog.text


def test_a_result_read_back_counts_the_seconds_its_optimisation_took(tmp_path, monkeypatch):
    """Stopped at the third of three δs (5 s each), the rerun's δ seconds are those of a run never stopped: 5 s
    optimising the third and the 10 s the first two took, though reading them back takes none."""
    folder, identity, clock = tmp_path / DELTA_CHECKPOINT, {"group": [0, 1, 2]}, [0.0]
    monkeypatch.setattr("sadr.editors.delta_checkpoint.time.perf_counter", lambda: clock[0])
    stopped, optimiser = {}, Optimiser(stop_at=3, clock=clock)
    with pytest.raises(KeyboardInterrupt), resumable_deltas(folder, identity), timed_deltas(stopped, "delta"):
        [optimiser(request) for request in "abc"]
    assert stopped == {"delta": 15.0}
    for optimised in (["c"], []):  # then with every result read back
        resumed, optimiser = {}, Optimiser(clock=clock)
        with resumable_deltas(folder, identity), timed_deltas(resumed, "delta"):
            [optimiser(request) for request in "abc"]
        assert optimiser.calls == optimised and resumed == {"delta": 15.0}
    outside: dict[str, float] = {}
    with timed_deltas(outside, "delta"):
        Optimiser(clock=clock)("a")
    assert outside == {"delta": 5.0}


def test_chunks_of_an_earlier_format_are_optimised_again(tmp_path):
    """Format 1 kept no seconds per result."""
    folder, identity = tmp_path / DELTA_CHECKPOINT, {"group": [0, 1]}
    with resumable_deltas(folder, identity):
        [Optimiser()(request) for request in "ab"]
    (chunk,) = folder.glob("*.pt")
    earlier = read_entry(chunk, TORCH)
    write_atomically({"identity": identity, "first": 0, "results": [result[:2] for result in earlier["results"]]},
                     chunk, TORCH)
    again = Optimiser()
    with resumable_deltas(folder, identity):
        [again(request) for request in "ab"]
    assert again.calls == ["a", "b"]


def test_outside_a_block_nothing_is_kept():
    optimiser = Optimiser()
    assert optimiser("a")["request"] == "a" and optimiser("a")["delta"].tolist() == [2.0, 2.0]


def test_results_are_written_at_most_every_few_seconds_inside_a_block(tmp_path, monkeypatch):
    """A kill (no chance to write at the block's end) loses only the δs finished since the last write."""
    folder, now = tmp_path / DELTA_CHECKPOINT, [0.0]
    monkeypatch.setattr("sadr.editors.delta_checkpoint.time.monotonic", lambda: now[0])
    written = []
    with resumable_deltas(folder, {"group": [0]}, every_seconds=60):
        for second, request in ((10, "a"), (60, "b"), (80, "c")):
            now[0] = second
            Optimiser()(request)
            written.append(len(list(folder.glob("*.pt"))))
    assert written == [0, 1, 1]  # "a" and "b" written together a minute in; "c" waits for the next minute (or the end)


def test_a_block_that_keeps_no_new_result_writes_no_chunk(tmp_path):
    """Stopped before its first δ (in the statistics pass, say), or with every result read back, a block writes
    nothing: an empty chunk would make the run refuse other settings for δs it does not hold. Another group's chunk
    is removed all the same."""
    folder, identity = tmp_path / DELTA_CHECKPOINT, {"group": [0]}
    another_group = {"format": FORMAT, "identity": {"group": [5]}, "first": 0, "results": [("'b'", {}, 1.0)]}
    write_atomically(another_group, folder / "000000.pt", TORCH)
    with pytest.raises(KeyboardInterrupt), resumable_deltas(folder, identity):
        raise KeyboardInterrupt
    assert not list(folder.glob("*.pt"))
    with resumable_deltas(folder, identity):
        Optimiser()("a")
    with resumable_deltas(folder, identity):
        Optimiser()("a")
    assert [path.name for path in folder.glob("*.pt")] == ["000000.pt"]


def test_after_a_block_its_results_are_no_longer_kept(tmp_path):
    folder = tmp_path / DELTA_CHECKPOINT
    with resumable_deltas(folder, {"group": [0, 1]}, every_seconds=0):
        Optimiser()("a")
    Optimiser()("b")
    assert [path.name for path in folder.glob("*.pt")] == ["000000.pt"]


def test_a_missing_chunk_ends_what_is_read_back_even_where_the_next_holds_the_same_request(tmp_path):
    """Each chunk holds the results from its first call on. With one gone, those after it would be read back as the
    results of earlier calls, which the request alone does not tell apart where a request comes twice (and ROME's δ
    of a request depends on the edits before it): they are optimised again."""
    folder, identity = tmp_path / DELTA_CHECKPOINT, {"group": [0, 1, 2]}
    first = Optimiser()
    with resumable_deltas(folder, identity, every_seconds=0):
        [first(request) for request in "aaa"]
    sorted(folder.glob("*.pt"))[1].unlink()
    again = Optimiser()
    with resumable_deltas(folder, identity):
        results = [again(request) for request in "aaa"]
    assert again.calls == ["a", "a"]
    assert [r["delta"].tolist() for r in results] == [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]


def test_results_kept_after_the_first_request_that_differs_are_not_read_back_after_a_later_stop(tmp_path):
    """The third result was optimised after "b": once "x" takes b's place, a stop in the same block must not leave it
    kept, to be read back after "x"."""
    folder, identity = tmp_path / DELTA_CHECKPOINT, {"group": [0, 1, 2]}
    with pytest.raises(KeyboardInterrupt), resumable_deltas(folder, identity, every_seconds=3600):
        optimiser = Optimiser(stop_at=3)
        [optimiser(request) for request in "abc"]
    with resumable_deltas(folder, identity, every_seconds=3600):
        [Optimiser()(request) for request in "abc"]
    assert len(list(folder.glob("*.pt"))) == 2  # "a" and "b", then "c"
    with pytest.raises(KeyboardInterrupt), resumable_deltas(folder, identity, every_seconds=3600):
        optimiser = Optimiser(stop_at=2)  # "x", then stopped as "c" begins
        [optimiser(request) for request in "axc"]
    again = Optimiser()
    with resumable_deltas(folder, identity):
        [again(request) for request in "axc"]
    assert again.calls == ["c"]


def test_each_timing_inside_a_block_counts_only_the_results_read_back_inside_it(tmp_path, monkeypatch):
    """ROME times each request's δ on its own (`v_star`): several timings in one block."""
    folder, identity, clock = tmp_path / DELTA_CHECKPOINT, {"group": [0, 1, 2]}, [0.0]
    monkeypatch.setattr("sadr.editors.delta_checkpoint.time.perf_counter", lambda: clock[0])
    with pytest.raises(KeyboardInterrupt), resumable_deltas(folder, identity):
        optimiser = Optimiser(stop_at=3, clock=clock)
        [optimiser(request) for request in "abc"]
    first, second, optimiser = {}, {}, Optimiser(clock=clock)
    with resumable_deltas(folder, identity):
        with timed_deltas(first, "v_star"):
            optimiser("a"), optimiser("b")
        with timed_deltas(second, "v_star"):
            optimiser("c")
    assert optimiser.calls == ["c"] and first == {"v_star": 10.0} and second == {"v_star": 5.0}


def _stopped_in_the_deltas(cfg, monkeypatch, stop_at: int) -> None:
    """Runs `cfg` and stops it (Ctrl-C) when its `stop_at`-th δ-optimisation begins."""
    original, calls = delta.optimize_deltas, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(delta, "optimize_deltas", stopping)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(delta, "optimize_deltas", original)


def _counting_deltas(monkeypatch) -> list[str]:
    original, subjects = delta.optimize_deltas, []

    def counting(model, adapter, tokenizer, requests, *args, **kwargs):
        subjects.extend(request.subject for request in requests)
        return original(model, adapter, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(delta, "optimize_deltas", counting)
    return subjects


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("editor, protocol", [("memit", "batch"), ("rome", "batch"), ("pmet", "sequential")])
def test_a_run_stopped_in_a_batch_s_deltas_resumes_from_them_with_the_rows_of_a_run_never_stopped(
        editor, protocol, tiny_dir, tmp_path, monkeypatch):
    """Batches of three: stopped as the third δ of the first batch begins, the rerun optimises only that one of the
    batch (then the second batch's); ROME's δs, each on the model its earlier requests edited, too. Once the batch's
    rows (or the sequential checkpoint) are written, its δs are gone from the run directory."""
    def cfg(out):
        given = tiny_overrides(tiny_dir, out, f"editor={editor}", f"editor.protocol={protocol}", "editor.batch_size=3")
        return composed([*(o for o in given if not o.startswith(("dataset.path=", "dataset.limit="))),
                         f"dataset.path={OFFLINE_RECORDS}", "dataset.limit=4"])

    whole = run_experiment(cfg(tmp_path / "whole"))
    _stopped_in_the_deltas(cfg(tmp_path / "run"), monkeypatch, stop_at=3)
    (chunk,) = (tmp_path / "run" / DELTA_CHECKPOINT).glob("*.pt")
    kept_seconds = sum(seconds for _, _, seconds in read_entry(chunk, TORCH)["results"])
    assert not (tmp_path / "run" / SEQUENTIAL_STATE).exists() and not (tmp_path / "run" / "cases.jsonl").exists()
    optimised = _counting_deltas(monkeypatch)
    out = run_experiment(cfg(tmp_path / "run"))
    assert len(optimised) == 2  # the first batch's third request, then the second batch's one
    assert _without_seconds(written_rows(out)) == _without_seconds(written_rows(whole))
    first_batch = written_rows(out)[0]["seconds"]
    assert first_batch["v_star" if editor == "rome" else "delta"] > kept_seconds  # the kept δs' seconds, and more
    assert not (out / DELTA_CHECKPOINT).exists()


def test_a_finished_run_killed_before_it_removed_its_last_groups_deltas_removes_them_when_resumed(tiny_dir, tmp_path,
                                                                                                  monkeypatch):
    """Killed after the last group's rows were written but before its δs were removed: the rerun has nothing to edit,
    and the δs, no longer of any use, would otherwise stay in the run directory for good."""
    out = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor=memit")))
    rows = written_rows(out)
    with resumable_deltas(out / DELTA_CHECKPOINT, {"group": [rows[-1]["case_id"]]}):
        kept_or_optimised("request", lambda: {"delta": 1.0}, dict, dict)
    assert list((out / DELTA_CHECKPOINT).glob("*.pt"))
    optimised = _counting_deltas(monkeypatch)
    assert run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor=memit"))) == out
    assert not optimised and written_rows(out) == rows
    assert not (out / DELTA_CHECKPOINT).exists()


def test_a_run_that_kept_deltas_refuses_other_settings_and_takes_them_once_they_are_deleted(tiny_dir, tmp_path,
                                                                                             monkeypatch):
    """A run stopped in its first batch's δs holds no row, but its δs (hours of a large batch) would be read back by
    a rerun: other settings are refused, as for a run with rows, naming the folder whose deletion starts it again;
    then the rows are those of the corrected run never stopped."""
    from sadr.results import RunConflictError

    def cfg(out, *extra):
        return composed(tiny_overrides(tiny_dir, out, "editor=memit", "editor.protocol=batch", "editor.batch_size=2",
                                       *extra))

    corrected = run_experiment(cfg(tmp_path / "corrected", "editor.v_lr=0.1"))
    _stopped_in_the_deltas(cfg(tmp_path / "run"), monkeypatch, stop_at=2)
    kept = tmp_path / "run" / DELTA_CHECKPOINT
    assert list(kept.glob("*.pt"))
    with pytest.raises(RunConflictError, match=rf"differs in: editor\.v_lr.*; or, to give up the δs it kept and start "
                                               rf"it again with these settings, delete {kept}$"):
        run_experiment(cfg(tmp_path / "run", "editor.v_lr=0.1"))
    discard_deltas(kept)
    optimised = _counting_deltas(monkeypatch)
    out = run_experiment(cfg(tmp_path / "run", "editor.v_lr=0.1"))
    assert len(optimised) == 2
    assert _without_seconds(written_rows(out)) == _without_seconds(written_rows(corrected))


def test_a_sequential_sadr_run_killed_as_it_checkpoints_a_group_resumes_from_that_group_s_deltas(tiny_dir, tmp_path,
                                                                                                 monkeypatch):
    """The group's δs are removed only once the checkpoint that holds its edit is written: killed while writing it,
    the rerun reads the δ back (optimising only the next case's), and is not refused as a run whose edit did not
    attach SADR's term, which a group read back attaches nowhere."""
    from sadr import runner

    cfg = composed(tiny_overrides(tiny_dir, tmp_path / "run", "editor.protocol=sequential", "sadr.lambda=0.1"))
    write = runner.write_atomically

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(runner, "write_atomically", write)
    kept = tmp_path / "run" / DELTA_CHECKPOINT
    assert not (tmp_path / "run" / SEQUENTIAL_STATE).exists() and list(kept.glob("*.pt"))
    optimised = _counting_deltas(monkeypatch)
    out = run_experiment(cfg)
    assert optimised == [written_rows(out)[1]["subject"]]
    assert [row["diagnostics"]["n_edits_in_model"] for row in written_rows(out)] == [2, 2]
