"""Every kind of bad input fails with a message naming the file, the record, the field and the fix."""

from __future__ import annotations

import json
import logging
import re
import unicodedata

import pytest

from sadr.conf.schema import InvalidRecordPolicy
from sadr.data.load import MalformedDatasetError, load_cases
from sadr.data.validation import InvalidRecordError
from tests.data_fixtures import FIXTURES, config, fixture_records, load_edited, write_records


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
    with pytest.raises(MalformedDatasetError, match=r"broken\.json: not valid JSON \(Expecting property name enclosed "
                                                   r"in double quotes: line 3, column 25\)\. .*; fix it, "
                                                   r"or give another file with dataset\.path\.$"):
        load_cases(config("counterfact", path), tmp_path)  # the user's own file: nothing would be downloaded again
    path.write_text('[\n {"case_id": 0,\n  "subject": "Danielle', encoding="utf-8")  # a copy cut short in a string
    with pytest.raises(MalformedDatasetError, match=r"not valid JSON \(Unterminated string starting at: line 3, "
                                                   r"column 14\)\. The file may be truncated"):
        load_cases(config("counterfact", path), tmp_path)


def test_top_level_must_be_a_list(tmp_path):
    path = write_records(tmp_path / "dict.json", {"data": []})
    with pytest.raises(MalformedDatasetError, match=r"expected a JSON list of records \[record, record, \.\.\.\], "
                                                   r"got a JSON dict; fix it, or give another file with "
                                                   r"dataset\.path\.$"):
        load_cases(config("zsre", path), tmp_path)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset.name='wikifacts'; expected one of: counterfact, "):
        load_cases(config("wikifacts"), tmp_path)


def test_missing_field(tmp_path):
    with pytest.raises(InvalidRecordError) as err:
        load_edited(tmp_path, "counterfact", lambda r: r[1]["requested_rewrite"].pop("subject"))
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
        load_edited(tmp_path, "counterfact", break_)


def test_record_that_is_not_an_object(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"record 1: expected a JSON object, got 'oops'"):
        load_edited(tmp_path, "zsre", lambda r: r.__setitem__(1, "oops"))


@pytest.mark.parametrize("prompt", ["The mother tongue of Velimir Ostrander is", "{} and {} speak"])
def test_counterfact_prompt_needs_exactly_one_subject_slot(tmp_path, prompt):
    with pytest.raises(InvalidRecordError) as err:
        load_edited(tmp_path, "counterfact", lambda r: r[0]["requested_rewrite"].__setitem__("prompt", prompt))
    assert "field 'requested_rewrite.prompt'" in str(err.value)
    assert 'containing "{}" exactly once' in str(err.value)


def test_paraphrase_must_contain_the_subject(tmp_path):
    def break_(records):
        records[2]["paraphrase_prompts"][0] = "A ferry left at dawn. Brakmoor belongs to the continent of"

    with pytest.raises(InvalidRecordError) as err:
        load_edited(tmp_path, "counterfact", break_)
    assert "record 2, field 'paraphrase_prompts[0]'" in str(err.value)
    assert "containing the subject 'Brakmoor Heights' verbatim" in str(err.value)


def test_zsre_src_must_contain_the_subject(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 1, field 'src': expected a prompt containing the subject 'Quillmoss'"
    ):
        load_edited(tmp_path, "zsre", lambda r: r[1].__setitem__("src", "Which order does quillmoss belong to?"))


def test_a_prompt_with_braces_of_its_own_is_rejected(tmp_path):
    """The subject's slot is marked "{}"; another "{}" in the prompt would take it (a traceback, or a wrong text)."""
    with pytest.raises(InvalidRecordError, match=r"record 1, field 'src': expected a prompt with no .\{\}. of its own"):
        load_edited(tmp_path, "zsre", lambda r: r[1].__setitem__("src", "In {} which order does Quillmoss belong to?"))
    subject_with_braces = load_edited(tmp_path, "zsre", lambda r: r[1].update(subject="Q{}", src="Is Q{} a moss?"))
    assert subject_with_braces.cases[1].request.prompt == "Is {} a moss?"


def test_a_subject_spelt_in_another_normalization_form_or_with_other_capitals_is_named_as_such(tmp_path):
    nfd = unicodedata.normalize("NFD", "Zoë")
    with pytest.raises(InvalidRecordError, match=r"field .src.: .* another Unicode normalization form: write both"):
        load_edited(tmp_path, "zsre", lambda r: r[1].update(subject="Zoë", src=f"Is {nfd} a moss?"))
    with pytest.raises(InvalidRecordError, match=r"field .src.: .* with other capitals: spell the subject as the"):
        load_edited(tmp_path, "zsre", lambda r: r[1].update(subject="Zoë", src="Is zoë a moss?"))


def test_zsre_needs_an_answer(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"field 'answers': expected a non-empty list of answers, got \[\]"):
        load_edited(tmp_path, "zsre", lambda r: r[0].__setitem__("answers", []))


def test_knowedit_prompt_must_contain_the_subject(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 2, field 'prompt': expected a prompt containing the subject 'Kelp Road'"
    ):
        load_edited(tmp_path, "knowedit_counterfact", lambda r: r[2].__setitem__("prompt", "Kelp Rd is followed by"))


def test_knowedit_nested_field_path(tmp_path):
    def break_(records):
        records[1]["locality"]["Forgetfulness"][0]["ground_truth"] = [[]]

    with pytest.raises(
        InvalidRecordError, match=r"field 'locality\.Forgetfulness\[0\]\.ground_truth': expected a non-empty string or"
    ):
        load_edited(tmp_path, "knowedit_counterfact", break_)


def test_sadr_merged_prompt_must_contain_the_subject(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 1, field 'requested_rewrite.prompt': expected a prompt containing"
    ):
        load_edited(tmp_path, "sadr_merged", lambda r: r[1]["requested_rewrite"].__setitem__("subject", "C. Ashby"))


def test_sadr_merged_neighbor_targets_must_be_the_true_object(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"record 1, field 'l-neighbor.targets\[1\]': expected 'blues'"):
        load_edited(tmp_path, "sadr_merged", lambda r: r[1]["l-neighbor"]["targets"].__setitem__(1, "rock"))


def test_sadr_merged_block_lengths_must_match(tmp_path):
    with pytest.raises(
        InvalidRecordError, match=r"record 0, field 'l-relation.targets': expected one target per prompt \(1\)"
    ):
        load_edited(tmp_path, "sadr_merged", lambda r: r[0]["l-relation"]["targets"].append("tailor"))


@pytest.mark.parametrize("change, expected", [
    (lambda block: block.pop("wrong"), r"field 'o-commonsense.wrong': expected a non-empty string or a list of them, "
                                       r"it is missing"),
    (lambda block: block.__setitem__("right", ""), r"field 'o-commonsense.right': expected a non-empty string, got ''"),
    (lambda block: block.__setitem__("right", ["a", "b"]),
     r"field 'o-commonsense.right': expected one continuation per prompt \(1\)"),
    (lambda block: block.__setitem__("wrong", ["a", "b"]),
     r"field 'o-commonsense.wrong': expected one continuation per prompt \(1\)"),
    (lambda block: block.__setitem__("prompts", ["Dry a wet shoe.", 3]),
     r"field 'o-commonsense.prompts\[1\]': expected a non-empty string, got 3"),
])
def test_a_malformed_sadr_merged_commonsense_block_is_named_and_its_case_kept_without_it(tmp_path, caplog, change,
                                                                                       expected):
    """Only CS and DCS read `o-commonsense`: a bad block costs its case those two, logged, not the record (a Table 3
    run, which does not ask for them, keeps every case of the file)."""
    with caplog.at_level(logging.WARNING, logger="sadr.data.sadr_merged"):
        cases = load_edited(tmp_path, "sadr_merged", lambda r: change(r[2]["o-commonsense"])).cases
    assert len(cases) == 4 and cases[2].commonsense_prompts == () and cases[2].portability
    assert all(case.commonsense_prompts for case in cases[:2] + cases[3:])
    (message,) = [record.getMessage() for record in caplog.records]
    assert re.search(r"record 2, " + expected, message)
    assert message.endswith("; that case has no commonsense question (CS, DCS); its other prompts are kept")


def test_skip_policy_counts_and_warns(tmp_path, caplog):
    def break_two(records):
        del records[0]["answers"]
        records[2]["src"] = "Who designed the bridge?"

    with caplog.at_level(logging.WARNING, logger="sadr.data.validation"):
        loaded = load_edited(tmp_path, "zsre", break_two, on_invalid=InvalidRecordPolicy.skip)
    assert loaded.n_invalid_skipped == 2
    assert [c.case_id for c in loaded.cases] == [1]  # ids stay the file positions
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("record 0, field 'answers'" in w for w in warnings)
    assert any("record 2, field 'src'" in w for w in warnings)
    assert any("skipped 2 invalid record(s) of 3" in w for w in warnings)
    assert not any("Fix the record, or set dataset.on_invalid=skip" in w for w in warnings)  # already set


def test_skip_policy_accepts_the_plain_string(tmp_path):
    loaded = load_edited(tmp_path, "counterfact", lambda r: r[1].pop("requested_rewrite"), on_invalid="skip")
    assert loaded.n_invalid_skipped == 1 and [c.case_id for c in loaded.cases] == [100, 102]


@pytest.mark.parametrize(
    "name, mutate, expected",
    [
        ("counterfact", lambda r: r[0]["requested_rewrite"].__setitem__("subject", None),
         "record 0, field 'requested_rewrite.subject': expected a non-empty string, got None"),
        ("counterfact", lambda r: r[0]["requested_rewrite"].__setitem__("subject", "   "),
         "record 0, field 'requested_rewrite.subject': expected a non-empty string, got '   '"),
        ("counterfact", lambda r: r[1].__setitem__("neighborhood_prompts", "Orrin plays the"),
         "record 1, field 'neighborhood_prompts': expected a list of non-empty strings, got 'Orrin plays the'"),
        ("counterfact", lambda r: r[0].__setitem__("case_id", True),
         "record 0, field 'case_id': expected an integer or a string id, got True"),
        ("counterfact", lambda r: r[0].__setitem__("case_id", 100.0),
         "record 0, field 'case_id': expected an integer or a string id, got 100.0"),
        ("counterfact", lambda r: r[2].__setitem__("requested_rewrite", "Brakmoor"),
         "record 2, field 'requested_rewrite': expected a JSON object, got 'Brakmoor'"),
        ("knowedit_counterfact", lambda r: r[0]["locality"]["Relation_Specificity"].__setitem__(0, "founder"),
         "record 0, field 'locality.Relation_Specificity[0]': expected a JSON object, got 'founder'"),
        ("knowedit_counterfact",
         lambda r: r[0]["locality"].__setitem__("Relation_Specificity", {"prompt": "p", "ground_truth": "g"}),
         "record 0, field 'locality.Relation_Specificity': expected a list of JSON objects, got {'prompt': 'p'"),
    ],
)
def test_a_value_of_the_wrong_kind_is_named_where_it_is(tmp_path, name, mutate, expected):
    """Null, blank, bool and float values, and a string or object where a list or object belongs, are each rejected at
    their own field (not accepted, and not reported somewhere further down the record)."""
    with pytest.raises(InvalidRecordError) as err:
        load_edited(tmp_path, name, mutate)
    assert expected in str(err.value)


def test_every_paraphrase_must_contain_the_subject_with_its_case(tmp_path):
    """The subject is located verbatim, so a later paraphrase that only spells it in lower case is rejected too."""
    def break_(records):
        records[0]["paraphrase_prompts"][1] = records[0]["paraphrase_prompts"][1].replace(
            "Velimir Ostrander", "velimir ostrander"
        )

    with pytest.raises(InvalidRecordError, match=r"record 0, field 'paraphrase_prompts\[1\]': expected a paraphrase"):
        load_edited(tmp_path, "counterfact", break_)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r[1]["requested_rewrite"].pop("target_true"),
         "record 1, field 'requested_rewrite.target_true': expected a non-empty string, it is missing"),
        (lambda r: r[1]["p-paraphrase"]["targets"].__setitem__(0, "jazz"),
         "record 1, field 'p-paraphrase.targets[0]': expected 'opera' (the request's target for this block), "
         "got 'jazz'"),
        (lambda r: r[1]["p-paraphrase"]["prompts"].__setitem__(1, "The genre played by C. Ashby is"),
         "record 1, field 'p-paraphrase.prompts[1]': expected a paraphrase containing the subject 'Corvin Ashby'"),
    ],
)
def test_sadr_merged_request_and_paraphrases_are_checked(tmp_path, mutate, expected):
    """The true object is required, and paraphrases must aim at the new object and mention the subject, like
    CounterFact's."""
    with pytest.raises(InvalidRecordError) as err:
        load_edited(tmp_path, "sadr_merged", mutate)
    assert expected in str(err.value)


@pytest.mark.parametrize("n_bad", [1, 11])
def test_skip_policy_names_ten_records_then_only_counts(tmp_path, caplog, n_bad):
    """Up to ten skipped records are named one by one (a non-object among them); the total is always logged."""
    records = ["oops"] + [{"subject": "Harwick Pell"}] * (n_bad - 1) + [fixture_records("zsre")[0]]
    with caplog.at_level(logging.WARNING, logger="sadr.data.validation"):
        loaded = load_cases(config("zsre", write_records(tmp_path / "z.json", records), on_invalid="skip"), tmp_path)
    assert loaded.n_invalid_skipped == n_bad and [c.case_id for c in loaded.cases] == [n_bad]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(w.startswith("skipping invalid record: ") for w in warnings) == min(n_bad, 10)
    assert warnings[-1].endswith(f"skipped {n_bad} invalid record(s) of {n_bad + 1} (dataset.on_invalid=skip)")


def test_a_file_that_is_not_utf8_is_a_malformed_dataset(tmp_path):
    """A Latin-1 file is reported as such, not as a bare UnicodeDecodeError."""
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"subject": "Zoë"}]'.encode("latin-1"))
    with pytest.raises(MalformedDatasetError, match=r"latin1\.json: not UTF-8 text .*expected a JSON dataset file: "
                                                   r"fix it, or give another file with dataset\.path\.$"):
        load_cases(config("zsre", path), tmp_path)


def test_why_empty_when_every_record_was_skipped(tmp_path):
    """With nothing loaded because all records were invalid, the reason names the skip policy, not an empty file."""
    loaded = load_edited(tmp_path, "zsre", lambda r: [rec.pop("answers") for rec in r], on_invalid="skip")
    assert loaded.cases == [] and loaded.why_empty() == (
        f"all 3 records of {tmp_path / 'zsre.json'} are invalid and were skipped (dataset.on_invalid=skip); "
        "set dataset.on_invalid=error to see why"
    )


@pytest.mark.parametrize("length, shown", [(78, "'" + "a" * 78 + "'"), (79, "'" + "a" * 76 + "...")])
def test_long_values_are_cut_at_80_characters(tmp_path, length, shown):
    """A found value is shown whole up to 80 characters of its repr, and cut to 77 plus "..." beyond."""
    with pytest.raises(InvalidRecordError) as err:
        load_edited(tmp_path, "counterfact", lambda r: r[0].__setitem__("neighborhood_prompts", "a" * length))
    assert str(err.value).endswith(f"got {shown}. Fix the record, or set dataset.on_invalid=skip to skip invalid "
                                   "records.")


def test_a_case_id_given_twice_is_named_with_both_records(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"record 2, field 'case_id': expected an id no other record has "
                                                 r"\(record 0 has it too\), got 100"):
        load_edited(tmp_path, "counterfact", lambda r: r[2].__setitem__("case_id", 100))


def test_skip_policy_keeps_the_first_record_of_an_id(tmp_path):
    loaded = load_edited(tmp_path, "counterfact", lambda r: r[2].__setitem__("case_id", "100"), on_invalid="skip")
    assert loaded.n_invalid_skipped == 1 and [c.case_id for c in loaded.cases] == [100, 101]


@pytest.mark.parametrize("name, mutate, field", [
    ("counterfact", lambda r: r[0]["requested_rewrite"]["target_new"].__setitem__("str", "Finnish"),
     "requested_rewrite.target_new.str"),
    ("sadr_merged", lambda r: r[0]["requested_rewrite"].__setitem__("target_new", "Kingdom of Emberly "),
     "requested_rewrite.target_new"),
    ("knowedit_counterfact", lambda r: r[0].__setitem__("target_new", "Estmark"), "target_new"),
])
def test_a_new_target_equal_to_the_true_answer_is_invalid(tmp_path, name, mutate, field):
    with pytest.raises(InvalidRecordError, match=rf"record 0, field '{re.escape(field)}': expected a new target other "
                                                 r"than the true answer"):
        load_edited(tmp_path, name, mutate)


def test_a_json_lines_file_is_named_as_such_with_the_fix(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in fixture_records("zsre")), encoding="utf-8")
    with pytest.raises(MalformedDatasetError, match=r"records\.jsonl: one JSON value per line \(JSON Lines\), but a "
                                                   r"dataset file is one JSON list of records; write the records as a list"):
        load_cases(config("zsre", path), tmp_path)


@pytest.mark.parametrize("text, where", [('[{"a": 1}] [{"b": 2}]', "line 1, column 12"),
                                         ('[{"a": 1}]\n  ]', "line 2, column 3")])
def test_a_list_followed_by_more_than_a_line_s_value_is_not_taken_for_json_lines(tmp_path, text, where):
    """JSON Lines puts its second value at the start of line 2; extra data anywhere else is a damaged file."""
    path = tmp_path / "records.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MalformedDatasetError, match=rf"records\.json: not valid JSON \(Extra data: {where}\)\. The file "
                                                   r"may be truncated or not a dataset"):
        load_cases(config("zsre", path), tmp_path)


@pytest.mark.parametrize("name, given_as, reads_as", [
    ("counterfact.json", "zsre", "dataset=counterfact or dataset=multi_counterfact"),
    ("zsre.json", "counterfact", "dataset=zsre"),
    ("knowedit_counterfact.json", "sadr_merged", "dataset=knowedit_counterfact"),
])
def test_a_file_of_another_format_names_the_format_it_reads_as(name, given_as, reads_as):
    """Its first record lacks a field of the given format, and another format reads it: the error says which, instead
    of suggesting on_invalid=skip, which would skip every record."""
    with pytest.raises(InvalidRecordError, match=rf"record 0, field '.*': expected .*, it is missing\. The file reads "
                                                 rf"as {reads_as}\b.*: give that instead of dataset={given_as}\.$"):
        load_cases(config(given_as, FIXTURES / name), "unused")


@pytest.mark.parametrize("name, given_as, field, reads_as", [
    ("counterfact.json", "sadr_merged", "target_true", "dataset=counterfact or dataset=multi_counterfact"),
    ("sadr_merged.json", "counterfact", "target_new", "dataset=sadr_merged"),
])
def test_a_file_of_another_format_with_a_field_of_another_kind_names_the_format_it_reads_as(name, given_as, field,
                                                                                              reads_as):
    """CounterFact and the SADR merged file both hold a `requested_rewrite`, with targets as objects in one and strings
    in the other: the first record's field is there but of another kind, and on_invalid=skip would skip every record."""
    with pytest.raises(InvalidRecordError, match=rf"record 0, field 'requested_rewrite\.{field}': expected .*got .*\. "
                                                 rf"The file reads as {reads_as}\b.*: give that instead of "
                                                 rf"dataset={given_as}, or fix the record\.$"):
        load_cases(config(given_as, FIXTURES / name), "unused")


def test_a_record_of_the_right_format_with_a_field_missing_gets_no_format_hint(tmp_path):
    records = fixture_records("counterfact")
    del records[0]["requested_rewrite"]["target_true"]
    path = write_records(tmp_path / "records.json", records)
    with pytest.raises(InvalidRecordError, match=r"field 'requested_rewrite\.target_true'.*it is missing\. Fix the record, "
                                                 r"or set dataset\.on_invalid=skip"):
        load_cases(config("counterfact", path), tmp_path)


@pytest.mark.parametrize("field", ["subject", "src", "answers", "rephrase", "loc", "loc_ans"])
def test_a_zsre_record_without_a_field_it_scores_is_invalid(tmp_path, field):
    """Every zsRE field the case is built from is required: a record without its rephrase or its NQ pair is not
    loaded with an empty prompt or answer, and a missing field is reported as missing."""
    with pytest.raises(InvalidRecordError, match=rf"record 1, field '{field}': expected .*, it is missing"):
        load_edited(tmp_path, "zsre", lambda r: r[1].pop(field))


def test_a_knowedit_locality_item_without_its_prompt_is_invalid(tmp_path):
    with pytest.raises(InvalidRecordError, match=r"record 1, field 'locality\.Forgetfulness\[0\]\.prompt': expected a "
                                                 r"non-empty string, it is missing"):
        load_edited(tmp_path, "knowedit_counterfact", lambda r: r[1]["locality"]["Forgetfulness"][0].pop("prompt"))


def test_a_new_target_that_differs_from_the_true_answer_only_by_a_leading_space_is_invalid(tmp_path):
    """A target is scored after a space whether or not it starts with one, so " Estmark" is the answer "Estmark"."""
    with pytest.raises(InvalidRecordError, match=r"record 0, field 'target_new': expected a new target other than the "
                                                 r"true answer 'Estmark', got ' Estmark'"):
        load_edited(tmp_path, "knowedit_counterfact", lambda r: r[0].__setitem__("target_new", " Estmark"))


def test_a_new_target_that_differs_from_the_true_answer_only_in_case_is_a_valid_edit(tmp_path):
    """"estmark" and "Estmark" are different tokens, so efficacy can tell them apart: the record is kept."""
    cases = load_edited(tmp_path, "knowedit_counterfact", lambda r: r[0].__setitem__("target_new", "estmark")).cases
    assert (cases[0].request.target_new, cases[0].request.target_true) == ("estmark", "Estmark")


def test_sadr_merged_commonsense_lists_shorter_than_the_prompts_are_malformed(tmp_path, caplog):
    """Two questions with one right and one wrong continuation: not read as one question (the second dropped by a
    zip), but logged, and the case kept without commonsense questions."""
    def change(records):
        records[2]["o-commonsense"] = {"prompts": ["Dry wet boots.", "Open a stuck jar."],
                                       "right": "Stuff them with paper.", "wrong": ["Stuff them with ice."]}

    with caplog.at_level(logging.WARNING, logger="sadr.data.sadr_merged"):
        cases = load_edited(tmp_path, "sadr_merged", change).cases
    assert len(cases) == 4 and cases[2].commonsense_prompts == ()
    (message,) = [record.getMessage() for record in caplog.records]
    assert "record 2, field 'o-commonsense.right': expected one continuation per prompt (2)" in message


def test_an_absent_or_null_sadr_merged_commonsense_block_logs_nothing(tmp_path, caplog):
    """A record without `o-commonsense` (or with null) simply has no commonsense question: that is not a malformed
    block, so nothing is logged for it."""
    def change(records):
        del records[1]["o-commonsense"]
        records[2]["o-commonsense"] = None

    with caplog.at_level(logging.WARNING, logger="sadr.data.sadr_merged"):
        cases = load_edited(tmp_path, "sadr_merged", change).cases
    assert cases[1].commonsense_prompts == cases[2].commonsense_prompts == ()
    assert [record.getMessage() for record in caplog.records] == []
