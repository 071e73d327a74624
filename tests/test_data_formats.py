"""Each format's fixture (own made-up records in the real schema, quirks included) loads into the right EditCases."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sadr.conf.schema import DatasetConfig, ZsreTarget
from sadr.data.load import load_cases
from sadr.data.records import ContrastPrompt, EditRequest, LabeledPrompt
from sadr.data.registry import FORMATS, DatasetFormat
from tests.data_fixtures import FIXTURES, REAL_SAMPLES, config, load_edited


def load(name, tmp_path, **overrides):
    return load_cases(config(name, **overrides), tmp_path)


def test_counterfact(tmp_path):
    loaded = load("counterfact", tmp_path)
    assert loaded.source == str(FIXTURES / "counterfact.json")
    assert loaded.n_invalid_skipped == 0
    assert [c.case_id for c in loaded.cases] == [100, 101, 102]
    first = loaded.cases[0]
    assert first.request == EditRequest(
        prompt="The mother tongue of {} is",
        subject="Velimir Ostrander",
        target_new="Portuguese",
        target_true="Finnish",
        relation_id="P103",
        target_new_id="Q9001",
    )
    assert first.request.text == "The mother tongue of Velimir Ostrander is"
    # paraphrases keep their random prefix and newlines verbatim
    assert first.paraphrase_prompts[1].startswith("Minutes of the 1911 meeting\n\nSee also\n")
    assert len(first.neighborhood_prompts) == 3
    assert first.generation_prompts.count("Velimir Ostrander's mother tongue is") == 2  # repeats kept
    assert first.relation_prompts == () and first.portability == {}
    second = loaded.cases[1]  # non-ASCII subject written as \u escapes, non-breaking spaces kept
    assert second.request.subject == "Zoë Quillfeather-Ñandú"
    assert second.request.text == "Zoë Quillfeather-Ñandú, who plays the"
    assert second.neighborhood_prompts[0] == "Orrin\u00a0B.\u00a0Haskett, who plays the"


def test_multi_counterfact_shares_the_schema(tmp_path):
    cases = load("multi_counterfact", tmp_path).cases
    assert [c.case_id for c in cases] == [0, 1]
    assert cases[1].request.target_new == "botany" and cases[1].request.target_true == "geology"
    assert cases[0].neighborhood_prompts and cases[0].paraphrase_prompts


def test_offline_counterfact_relation_specificity(tmp_path):
    cases = load("offline_counterfact", tmp_path).cases
    assert cases[0].relation_prompts == (
        LabeledPrompt("The official language of Duchy of Quenmark is", "Quennish"),
        LabeledPrompt("The currency of Duchy of Quenmark is", "mark"),
    )
    # the list is optional, and so are attribute / generation prompts
    assert cases[1].relation_prompts == () and cases[1].generation_prompts == ()
    assert cases[1].paraphrase_prompts == ("The Glass Orchard is a novel by",)


def test_offline_counterfact_reads_the_packaged_file_by_default(tmp_path, monkeypatch):
    missing = DatasetFormat(FORMATS["offline_counterfact"].parse, packaged="offline/no_such_file.json")
    monkeypatch.setitem(FORMATS, "offline_counterfact", missing)
    with pytest.raises(FileNotFoundError) as err:
        load_cases(DatasetConfig(name="offline_counterfact"), tmp_path)
    message = str(err.value)
    assert "sadr/data/offline/no_such_file.json" in message and "dataset.path=" in message


def test_offline_counterfact_packaged_dataset_loads_when_present(tmp_path):
    from importlib.resources import files

    if not files("sadr.data").joinpath("offline/counterfact_offline.json").is_file():
        pytest.skip("the embedded offline dataset is not written yet")
    loaded = load_cases(DatasetConfig(name="offline_counterfact"), tmp_path)
    assert loaded.cases and loaded.source.endswith("counterfact_offline.json")


def test_zsre_answers_target(tmp_path):
    cases = load("zsre", tmp_path).cases
    assert [c.case_id for c in cases] == [0, 1, 2]  # numbered by position, as in ROME
    first = cases[0]
    assert first.request == EditRequest("Which college did {} attend?", "Harwick Pell", "Grayhaven University", None)
    assert first.paraphrase_prompts == ("Harwick Pell studied at which college?",)
    # ROME's locality prompt: the NQ question keeps its "nq question: " prefix and gets a "?"
    assert first.locality_prompts == (
        LabeledPrompt("nq question: who painted the ceiling of the old lantern hall?", "Edda Lorne"),
    )
    assert cases[1].request.target_new == "Bryales"  # answers[0]
    # a subject that occurs twice: only the first occurrence becomes the template slot
    third = cases[2].request
    assert third.prompt == "Who designed {}, and when was Stormward Bridge opened?"
    assert third.text == "Who designed Stormward Bridge, and when was Stormward Bridge opened?"


def test_the_subject_slot_is_its_first_occurrence_as_a_whole_word(tmp_path):
    """"Paris" inside "Parisian" is not the subject: its last token would be a piece of another word."""
    def edit(records):
        records[0].update(subject="Paris", src="Which Parisian college did Paris attend?")
        records[1].update(subject="Pari", src="Which college did Parisian Pari attend?")
        # a subject that begins and ends with punctuation is a whole word wherever it stands
        records[2].update(subject="(Paris)", src="Which college did x(Paris) attend, unlike (Paris)?")

    cases = load_edited(tmp_path, "zsre", edit).cases
    assert cases[0].request.prompt == "Which Parisian college did {} attend?"
    assert cases[1].request.prompt == "Which college did Parisian {} attend?"
    assert cases[2].request.prompt == "Which college did x{} attend, unlike (Paris)?"


def test_zsre_alt_target(tmp_path):
    cases = load("zsre", tmp_path, target=ZsreTarget.alt).cases
    assert (cases[0].request.target_new, cases[0].request.target_true) == ("Fenwater Institute", "Grayhaven University")


def test_knowedit_counterfact(tmp_path):
    cases = load("knowedit_counterfact", tmp_path).cases
    first = cases[0]
    assert first.request.prompt == "The name of the country which {} is associated with is"
    assert (first.request.target_new, first.request.target_true) == ("Valdoria", "Estmark")
    assert first.portability == {
        "Reasoning": (
            LabeledPrompt(
                "The name of the capital city of the country Order of the Amber Quill is associated with is",
                "Valdor City",
            ),
        ),
        "Subject_Aliasing": (
            LabeledPrompt("The name of the country which Amber Quill Order is associated with is", "Valdoria"),
        ),
    }
    assert first.relation_prompts == (
        LabeledPrompt("The name of the founder of Order of the Amber Quill is", "Teodor Brann"),
    )
    assert first.locality_prompts == ()
    second = cases[1]
    assert second.request.target_true == "cartographer"  # first alias of the top-level ground_truth list
    assert second.portability["Logical_Generalization"] == (LabeledPrompt("Is Jörn Halvass a cartographer?", "no"),)
    assert second.locality_prompts == (  # Forgetfulness
        LabeledPrompt("The occupation of Jörn Halvass, which is not lighthouse keeper, is", "cartographer"),
    )
    assert cases[2].portability == {} and cases[2].relation_prompts == ()


def test_sadr_merged(tmp_path):
    cases = load("sadr_merged", tmp_path).cases
    knowedit_half, counterfact_half, alias, empty_neighbors = cases
    assert knowedit_half.request.prompt == "The name of the country of citizenship of {} is"
    assert knowedit_half.request.relation_id is None
    assert knowedit_half.portability == {
        "Reasoning": (
            LabeledPrompt("The official language of the country of citizenship of Wenna Tallow is", "Saltic"),
            LabeledPrompt("The official language of the country of citizenship of Wenna Tallow is", "Marsh Saltic"),
        )
    }
    assert knowedit_half.relation_prompts == (LabeledPrompt("The occupation of Wenna Tallow is", "weaver"),)
    assert knowedit_half.paraphrase_prompts == () and knowedit_half.neighborhood_prompts == ()

    assert counterfact_half.request == EditRequest("{} performs", "Corvin Ashby", "opera", "blues", "P136", "Q9031")
    assert counterfact_half.paraphrase_prompts[1].startswith("Notes\n\nFurther reading")
    assert counterfact_half.neighborhood_prompts == ("Della Marr plays", "What does Olin Fisk play? They play")
    assert counterfact_half.generation_prompts == ("Corvin Ashby is known for",) * 2

    assert alias.portability == {"Subject_Aliasing": (LabeledPrompt("The Tidewatch follows", "Gull Lock"),)}
    assert alias.neighborhood_prompts == () and alias.relation_prompts == ()
    assert empty_neighbors.neighborhood_prompts == () and empty_neighbors.paraphrase_prompts
    assert knowedit_half.commonsense_prompts == (
        ContrastPrompt("How do I keep a kite from tangling?", "Wind the line on a flat card.", "Wind the line on a wet card."),)
    assert all(len(case.commonsense_prompts) == 1 for case in cases)


def test_sadr_merged_commonsense_reads_lists_and_is_optional(tmp_path):
    """`o-commonsense` as the file has it (three strings), as three lists of one length, or absent."""
    def change(records):
        records[0]["o-commonsense"] = {"prompts": ["Dry a wet shoe.", "Open a stuck jar."],
                                       "right": ["Stuff it with paper.", "Run the lid under hot water."],
                                       "wrong": ["Stuff it with ice.", "Run the lid under cold water."]}
        del records[1]["o-commonsense"]
        records[2]["o-commonsense"] = None

    cases = load_edited(tmp_path, "sadr_merged", change).cases
    assert cases[0].commonsense_prompts == (
        ContrastPrompt("Dry a wet shoe.", "Stuff it with paper.", "Stuff it with ice."),
        ContrastPrompt("Open a stuck jar.", "Run the lid under hot water.", "Run the lid under cold water."))
    assert cases[1].commonsense_prompts == cases[2].commonsense_prompts == ()


def test_loads_from_an_omegaconf_structured_config(tmp_path):
    cfg = OmegaConf.structured(config("zsre", target=ZsreTarget.alt, on_invalid="skip", case_ids=[2, 0]))
    loaded = load_cases(cfg, tmp_path)
    assert [c.case_id for c in loaded.cases] == [0, 2]
    assert loaded.cases[0].request.target_new == "Fenwater Institute"


@pytest.mark.parametrize(
    "name, sample",
    [
        ("counterfact", "counterfact_sample.json"),
        ("multi_counterfact", "counterfact_sample.json"),
        ("zsre", "zsre_mend_eval_sample.json"),
        ("knowedit_counterfact", "knowedit_wiki_counterfact_sample.json"),
        ("sadr_merged", "sadr_merged_counterfact_sample.json"),
    ],
)
def test_real_samples_load(name, sample, tmp_path):
    path = REAL_SAMPLES / sample
    if not path.is_file():
        pytest.skip(f"real samples not available at {REAL_SAMPLES}")
    loaded = load_cases(config(name, path), tmp_path)
    assert loaded.n_invalid_skipped == 0 and loaded.cases
    for case in loaded.cases:
        assert case.request.prompt.count("{}") == 1 and case.request.subject in case.request.text
        assert all(case.request.subject in p for p in case.paraphrase_prompts)


def test_every_format_has_a_fixture_and_a_conf_file():
    conf_dir = Path(__file__).resolve().parents[1] / "sadr" / "conf" / "dataset"
    for name in FORMATS:
        assert (FIXTURES / f"{name}.json").is_file()
        if name != "offline_counterfact":  # its conf file comes with the offline dataset
            conf = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(conf_dir / f"{name}.yaml"))
            assert conf.name == name and conf.path is None
            assert conf.url == FORMATS[name].remote.url  # the conf file and the registry agree


def test_counterfact_relation_and_object_ids_are_optional(tmp_path):
    """A record without relation_id, or with a null Wikidata id (as in the offline dataset), loads with None."""
    def change(records):
        del records[0]["requested_rewrite"]["relation_id"]
        records[0]["requested_rewrite"]["target_new"]["id"] = None

    request = load_edited(tmp_path, "counterfact", change).cases[0].request
    assert (request.relation_id, request.target_new_id, request.target_new) == (None, None, "Portuguese")


def test_an_optional_field_given_as_null_is_absent(tmp_path):
    """null in an optional list or object field reads as the field left out, as it already did for optional strings
    (a JSON writer may emit null for an empty field)."""
    def change(records):
        records[0]["generation_prompts"] = None
        records[0]["neighborhood_prompts"] = None

    counterfact = load_edited(tmp_path, "counterfact", change).cases[0]
    assert (counterfact.generation_prompts, counterfact.neighborhood_prompts) == ((), ())
    knowedit = load_edited(tmp_path, "knowedit_counterfact", lambda records: records[2].__setitem__("portability", None))
    assert knowedit.cases[2].portability == {}


@pytest.mark.parametrize("name, n", [("zsre", 3), ("knowedit_counterfact", 3), ("sadr_merged", 4)])
def test_formats_without_ids_number_cases_from_zero(tmp_path, name, n):
    """zsRE, KnowEdit and SADR-merged cases are numbered by file position from 0, as the selection message says."""
    assert [c.case_id for c in load(name, tmp_path).cases] == list(range(n))


def test_knowedit_portability_and_locality_are_optional(tmp_path):
    """A record without `portability`/`locality`, or with an empty list in them, has no such prompts (no empty
    portability entry that a metric would average over)."""
    def change(records):
        del records[2]["portability"], records[2]["locality"]
        records[0]["portability"]["Logical_Generalization"] = []

    cases = load_edited(tmp_path, "knowedit_counterfact", change).cases
    assert set(cases[0].portability) == {"Reasoning", "Subject_Aliasing"}
    assert (cases[2].portability, cases[2].relation_prompts, cases[2].locality_prompts) == ({}, (), ())


def test_sadr_merged_keeps_every_relation_prompt(tmp_path):
    """All prompts of an `l-relation` block become relation prompts, in order."""
    def change(records):
        records[0]["l-relation"] = {"prompts": ["The occupation of Wenna Tallow is", "Wenna Tallow was born in"],
                                    "targets": ["weaver", "Duskport"]}

    assert load_edited(tmp_path, "sadr_merged", change).cases[0].relation_prompts == (
        LabeledPrompt("The occupation of Wenna Tallow is", "weaver"),
        LabeledPrompt("Wenna Tallow was born in", "Duskport"),
    )


@pytest.mark.parametrize("target", [ZsreTarget.answers, ZsreTarget.alt])
def test_zsre_cases_are_token_scored_under_both_targets(tmp_path, target):
    """zsRE is scored by top-1 token accuracy whichever answer it edits towards; CounterFact by p(new) vs p(true)."""
    assert all(case.token_scored for case in load("zsre", tmp_path, target=target).cases)
    assert not any(case.token_scored for case in load("counterfact", tmp_path).cases)


def test_dataset_path_expands_the_home_directory(tmp_path, monkeypatch):
    """dataset.path=~/file.json reads the file in the user's home, as a shell would."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cf.json").write_bytes((FIXTURES / "counterfact.json").read_bytes())
    loaded = load_cases(config("counterfact", "~/cf.json"), tmp_path)
    assert loaded.source == str(tmp_path / "cf.json") and len(loaded.cases) == 3


def test_zsre_alt_target_takes_the_first_answer_as_the_true_one(tmp_path):
    """With dataset.target=alt (EasyEdit), the true answer is answers[0] even when the record lists several."""
    second = load("zsre", tmp_path, target=ZsreTarget.alt).cases[1].request  # answers: ["Bryales", "Bryales order"]
    assert (second.target_new, second.target_true) == ("Ferninae", "Bryales")
