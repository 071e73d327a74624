"""Selection: case_ids, then limit, then shard "i/n" (1-based, contiguous), recorded in `selection`."""

from __future__ import annotations

import re

import pytest

from sadr.data.load import load_cases
from sadr.data.records import EditCase, EditRequest
from sadr.data.selection import Selection, parse_shard
from tests.data_fixtures import config, write_records


def cases(n):
    return [EditCase(i, EditRequest("{} is", f"s{i}", "new")) for i in range(n)]


def ids(selected):
    return [c.case_id for c in selected]


def test_nothing_selected_keeps_everything():
    selected, applied = Selection().apply(cases(4))
    assert ids(selected) == [0, 1, 2, 3]
    assert applied == {
        "n_loaded": 4,
        "case_ids": None,
        "shard": None,
        "shard_range": None,
        "limit": None,
        "n_selected": 4,
    }


def test_case_ids_keep_dataset_order_and_match_by_string():
    selected, applied = Selection(case_ids=(5, "2", 7)).apply(cases(10))
    assert ids(selected) == [2, 5, 7]
    assert applied["case_ids"] == [5, "2", 7]


def test_unknown_case_ids_are_listed():
    with pytest.raises(ValueError, match=r"dataset.case_ids: no case with id 12, 40 among the 10 loaded cases"):
        Selection(case_ids=(3, 40, 12)).apply(cases(10))


def test_shards_are_contiguous_and_cover_everything():
    parts = [Selection(shard=(i, 3)).apply(cases(10)) for i in (1, 2, 3)]
    assert [ids(p) for p, _ in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert parts[1][1]["shard"] == "2/3" and parts[1][1]["shard_range"] == [3, 6]


def test_order_is_case_ids_then_limit_then_shard():
    selected, applied = Selection(case_ids=(1, 3, 4, 6, 8, 9), shard=(2, 2), limit=4).apply(cases(10))
    assert ids(selected) == [4, 6]  # ids -> [1,3,4,6,8,9]; limit 4 -> [1,3,4,6]; shard 2/2 -> [4,6]
    assert applied["n_loaded"] == 10 and applied["n_selected"] == 2 and applied["shard_range"] == [2, 4]


def test_the_shards_of_a_limited_selection_are_that_selection():
    """A sweep over dataset.shard=1/n..n/n edits the cases of the same command without a shard (limit included)."""
    whole, _ = Selection(limit=7).apply(cases(20))
    parts = [Selection(shard=(i, 3), limit=7).apply(cases(20))[0] for i in (1, 2, 3)]
    assert [case for part in parts for case in part] == whole and ids(whole) == list(range(7))


@pytest.mark.parametrize("value", ["0/8", "9/8", "a/b", "1/0", "3", "1/2/3", "-1/4", ""])
def test_malformed_shards_are_rejected(value):
    with pytest.raises(ValueError) as err:
        parse_shard(value)
    assert f"dataset.shard={value!r} is not valid" in str(err.value) and "1 <= i <= n" in str(err.value)


def test_shard_parsing():
    assert parse_shard("1/8") == (1, 8) and parse_shard(" 8 / 8 ") == (8, 8)
    assert parse_shard("10/12") == (10, 12)  # a sweep over more than nine shards


@pytest.mark.parametrize("limit", [-1, 1.5, True])
def test_bad_limit_is_rejected(limit, tmp_path):
    with pytest.raises(ValueError, match="dataset.limit=.* is not valid: expected a non-negative integer"):
        Selection.from_config(config("zsre", limit=limit))


def test_bad_shard_fails_before_reading_the_file(tmp_path):
    with pytest.raises(ValueError, match="dataset.shard='9/8'"):
        load_cases(config("counterfact", tmp_path / "absent.json", shard="9/8"), tmp_path)


def test_load_cases_records_the_selection(tmp_path):
    loaded = load_cases(config("counterfact", case_ids=[102, 100], shard="1/2", limit=5), tmp_path)
    assert ids(loaded.cases) == [100]
    assert loaded.selection == {
        "n_loaded": 3,
        "case_ids": [102, 100],
        "shard": "1/2",
        "shard_range": [0, 1],
        "limit": 5,
        "n_selected": 1,
    }


def test_limit_zero_selects_nothing(tmp_path):
    path = write_records(tmp_path / "z.json", [])
    assert load_cases(config("zsre", path, limit=0), tmp_path).cases == []


def test_limit_zero_selects_nothing_of_a_nonempty_dataset():
    """limit=0 keeps no case (it is not "no limit")."""
    selected, applied = Selection(limit=0).apply(cases(3))
    assert selected == [] and applied["n_selected"] == 0 and applied["limit"] == 0


def test_an_empty_case_id_list_selects_nothing():
    """case_ids=[] is a selection of no case, unlike case_ids=null, which keeps all."""
    assert Selection.from_config(config("zsre", case_ids=[])).apply(cases(3))[0] == []
    assert ids(Selection.from_config(config("zsre", case_ids=None)).apply(cases(3))[0]) == [0, 1, 2]


def test_unknown_numeric_case_ids_are_listed_in_numeric_order():
    """Missing ids are sorted as numbers read (shorter first), not as strings ("100" before "12")."""
    with pytest.raises(ValueError, match=r"no case with id 9, 12, 100 among the 5 loaded cases"):
        Selection(case_ids=(100, 9, 12, 1)).apply(cases(5))


def test_a_selection_that_leaves_cases_out_is_logged_and_a_file_under_the_default_dataset_warned_of(tmp_path, caplog):
    """A CounterFact file given by dataset.path alone is read by the default dataset=offline_counterfact, whose
    limit of 20 keeps 20 of its records without an error: the log says so, and what to give instead."""
    import logging

    from tests.data_fixtures import FIXTURES

    counterfact = FIXTURES / "counterfact.json"  # 3 records, which offline_counterfact's parser reads
    with caplog.at_level(logging.INFO, logger="sadr.data.load"):
        assert len(load_cases(config("offline_counterfact", counterfact, limit=2), tmp_path).cases) == 2
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"dataset=offline_counterfact: 2 of the 3 cases of {counterfact} are selected (dataset.limit=2)"),
        ("WARNING", f"dataset.path={counterfact} is read as dataset=offline_counterfact (the default), whose "
                    "dataset.limit=2 keeps 2 of its 3 records; for a CounterFact file, give dataset=counterfact")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sadr.data.load"):
        load_cases(config("counterfact", limit=2, shard="1/2"), tmp_path)
        load_cases(config("offline_counterfact", counterfact, limit=3), tmp_path)  # every record: nothing to say
        load_cases(config("offline_counterfact", counterfact, case_ids=[100]), tmp_path)
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records] == [
        ("INFO", "dataset=counterfact"), ("INFO", "dataset=offline_counterfact")]


@pytest.mark.parametrize("case_ids", [[1, 1], [3, 7, "7"]])
def test_a_case_id_listed_twice_is_refused_before_the_file_is_read(case_ids, tmp_path):
    """The file does not exist: the selection fails first, naming the repeated id."""
    repeated = str(case_ids[-1])
    with pytest.raises(ValueError, match=rf"dataset.case_ids lists {repeated} more than once"):
        load_cases(config("zsre", tmp_path / "absent.json", case_ids=case_ids), tmp_path)


@pytest.mark.parametrize("override, message", [("dataset.shard=3/2", "dataset.shard='3/2' is not valid"),
                                               ("dataset.case_ids=[4,4]", "dataset.case_ids lists 4 more than once"),
                                               ("dataset.limit=-1", "dataset.limit=-1 is not valid")])
def test_a_bad_selection_is_refused_with_the_config(override, message):
    """Checked where the config is composed, so a sweep with one bad selection starts none of its jobs."""
    from sadr.conf.registry import compose_config

    with pytest.raises(ValueError, match=re.escape(message)):
        compose_config([override])


def test_every_repeated_case_id_is_named_once_in_the_order_first_listed(tmp_path):
    with pytest.raises(ValueError, match=r"dataset\.case_ids lists 5, 2 more than once \("):
        load_cases(config("zsre", tmp_path / "absent.json", case_ids=[5, 2, "2", 3, 5, 2]), tmp_path)
