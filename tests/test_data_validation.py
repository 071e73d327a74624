"""Every kind of bad input fails with a message naming the file, the record, the field and the fix."""

from __future__ import annotations

import logging

import pytest

from sadr.conf.schema import InvalidRecordPolicy
from sadr.data.load import MalformedDatasetError, load_cases
from sadr.data.validation import InvalidRecordError
from tests.data_fixtures import config, fixture_records, write_records


def load_broken(tmp_path, name, mutate, **overrides):
    """Load the `name` fixture after `mutate(records)` has broken it."""
    records = fixture_records(name)
    mutate(records)
    return load_cases(config(name, write_records(tmp_path / f"{name}.json", records), **overrides), tmp_path)


def test_missing_file_names_the_path_and_the_key(tmp_path):
    missing = tmp_path / "nowhere" / "counterfact.json"
    with pytest.raises(FileNotFoundError) as err:
        load_cases(config("counterfact", missing), tmp_path)
    assert str(missing) in str(err.value) and "dataset.path=" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"dataset file is a directory, not a file: .* \(dataset\.path\)"):
        load_cases(config("counterfact", tmp_path), tmp_path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"case_id": 0,\n  "requested_rewrite": {]\n]\n', encoding="utf-8")
    with pytest.raises(MalformedDatasetError, match=r"broken\.json: not valid JSON at line 3, column 25: .*; fix it, "
                                                   r"or give another file with dataset\.path\.$"):
        load_cases(config("counterfact", path), tmp_path)  # the user's own file: nothing would be downloaded again


def test_top_level_must_be_a_list(tmp_path):
    path = write_records(tmp_path / "dict.json", {"data": []})
    with pytest.raises(MalformedDatasetError, match="expected a JSON list of records, got a JSON dict"):
        load_cases(config("zsre", path), tmp_path)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset.name='wikifacts'; expected one of: counterfact, "):
        load_cases(config("wikifacts"), tmp_path)


def test_missing_field(tmp_path):
    with pytest.raises(InvalidRecordError) as err:
        load_broken(tmp_path, "counterfact", lambda r: r[1]["requested_rewrite"].pop("subject"))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'counterfact.json'}: record 1, field 'requested_rewrite.subject': ")
    assert "expected a non-empty string, it is missing" in message
    assert "dataset.on_invalid=skip" in message
    assert (err.value.index, err.value.field) == (1, "requested_rewrite.subject")


def test_wrong_type_shows_what_was_found(tmp_path):
    def break_(records):
        records[0]["neighborhood_prompts"][2] = 7

    with pytest.raises(
        InvalidRecordError, match=r"record 0, field 'neighborhood_prompts\[2\]': expected a non-empty string, got 7"
    ):
        load_broken(tmp_path, "counterfact", break_)


def test_record_that_is_not_an_object(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"record 1: expected a JSON object, got 'oops'"):
        load_broken(tmp_path, "zsre", lambda r: r.__setitem__(1, "oops"))


@pytest.mark.parametrize("prompt", ["The mother tongue of Velimir Ostrander is", "{} and {} speak"])
def test_counterfact_prompt_needs_exactly_one_subject_slot(tmp_path, prompt):
    with pytest.raises(InvalidRecordError) as err:
        load_broken(tmp_path, "counterfact", lambda r: r[0]["requested_rewrite"].__setitem__("prompt", prompt))
    assert "field 'requested_rewrite.prompt'" in str(err.value)
    assert 'containing "{}" exactly once' in str(err.value)


def test_paraphrase_must_contain_the_subject(tmp_path):
    def break_(records):
        records[2]["paraphrase_prompts"][0] = "A ferry left at dawn. Brakmoor belongs to the continent of"

    with pytest.raises(InvalidRecordError) as err:
        load_broken(tmp_path, "counterfact", break_)
    assert "record 2, field 'paraphrase_prompts[0]'" in str(err.value)
    assert "containing the subject 'Brakmoor Heights' verbatim" in str(err.value)


def test_zsre_src_must_contain_the_subject(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 1, field 'src': expected a prompt containing the subject 'Quillmoss'"
    ):
        load_broken(tmp_path, "zsre", lambda r: r[1].__setitem__("src", "Which order does quillmoss belong to?"))


def test_zsre_needs_an_answer(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"field 'answers': expected a non-empty list of answers, got \[\]"):
        load_broken(tmp_path, "zsre", lambda r: r[0].__setitem__("answers", []))


def test_knowedit_prompt_must_contain_the_subject(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 2, field 'prompt': expected a prompt containing the subject 'Kelp Road'"
    ):
        load_broken(tmp_path, "knowedit_counterfact", lambda r: r[2].__setitem__("prompt", "Kelp Rd is followed by"))


def test_knowedit_nested_field_path(tmp_path):
    def break_(records):
        records[1]["locality"]["Forgetfulness"][0]["ground_truth"] = [[]]

    with pytest.raises(
        InvalidRecordError, match=r"field 'locality\.Forgetfulness\[0\]\.ground_truth': expected a non-empty string or"
    ):
        load_broken(tmp_path, "knowedit_counterfact", break_)


def test_sadr_merged_prompt_must_contain_the_subject(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 1, field 'requested_rewrite.prompt': expected a prompt containing"
    ):
        load_broken(tmp_path, "sadr_merged", lambda r: r[1]["requested_rewrite"].__setitem__("subject", "C. Ashby"))


def test_sadr_merged_neighbor_targets_must_be_the_true_object(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"record 1, field 'l-neighbor.targets\[1\]': expected 'blues'"):
        load_broken(tmp_path, "sadr_merged", lambda r: r[1]["l-neighbor"]["targets"].__setitem__(1, "rock"))


def test_sadr_merged_block_lengths_must_match(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 0, field 'l-relation.targets': expected one target per prompt \(1\)"
    ):
        load_broken(tmp_path, "sadr_merged", lambda r: r[0]["l-relation"]["targets"].append("tailor"))


def test_skip_policy_counts_and_warns(tmp_path, caplog):
    def break_two(records):
        del records[0]["answers"]
        records[2]["src"] = "Who designed the bridge?"

    with caplog.at_level(logging.WARNING, logger="sadr.data.validation"):
        loaded = load_broken(tmp_path, "zsre", break_two, on_invalid=InvalidRecordPolicy.skip)
    assert loaded.n_invalid_skipped == 2
    assert [c.case_id for c in loaded.cases] == [1]  # ids stay the file positions
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("record 0, field 'answers'" in w for w in warnings)
    assert any("record 2, field 'src'" in w for w in warnings)
    assert any("skipped 2 invalid record(s) of 3" in w for w in warnings)
    assert not any("Fix the record, or set dataset.on_invalid=skip" in w for w in warnings)  # already set


def test_skip_policy_accepts_the_plain_string(tmp_path):
    loaded = load_broken(tmp_path, "counterfact", lambda r: r[1].pop("requested_rewrite"), on_invalid="skip")
    assert loaded.n_invalid_skipped == 1 and [c.case_id for c in loaded.cases] == [100, 102]
