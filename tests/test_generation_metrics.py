"""GenerationMetrics: seeded per case, independent of batching, fluency per text, consistency only from real files."""
from __future__ import annotations

import json
import logging
import unicodedata

import numpy as np
import pandas as pd
import pytest
import torch

from sadr.conf.registry import compose_config
from sadr.data.records import EditCase, EditRequest
from sadr.evaluation import generation_metrics
from sadr.evaluation.consistency import load_consistency_data
from sadr.evaluation.fluency import ngram_entropy
from sadr.evaluation.generation_metrics import GenerationMetrics, case_seed, text_seed
from sadr.models.generation import sample_each_to_length_like_rome, sample_texts
from sadr.runner import run_experiment
from tests.runs import FIXTURES, composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)
from tests.tiny_models import FAMILIES, make_model, make_tokenizer

WORDS = ["capital", "france", "paris", "japan", "company", "city", "london", "england"]


def write_tfidf_files(directory, relation: str, target: str) -> None:
    """ROME's three files, tiny: the tiny corpus's words, and two snippets for (relation, target)."""
    np.save(directory / "idf.npy", np.arange(1.0, len(WORDS) + 1))
    (directory / "tfidf_vocab.json").write_text(json.dumps({w: i for i, w in enumerate(WORDS)}))
    snippets = [{"relation_id": relation, "target_id": target,
                 "samples": [{"text": "The capital of France is Paris."}, {"text": "London is a city in England."}]}]
    (directory / "attribute_snippets.json").write_text(json.dumps(snippets))


def case(case_id, prompts=("The capital of France is", "Toyota is a company"), relation="P1", target="Q7") -> EditCase:
    request = EditRequest("{} is in", "Toyota", "France", "Japan", relation_id=relation, target_new_id=target)
    return EditCase(case_id, request, generation_prompts=tuple(prompts))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_model("llama"), make_tokenizer()


def evaluate(model_and_tokenizer, cases, **settings):
    model, tokenizer = model_and_tokenizer
    return GenerationMetrics(seed=settings.pop("seed", 0), length=settings.pop("length", 20), **settings).evaluate(
        model, tokenizer, None, cases)


@pytest.mark.parametrize("style", ["reference", "fixed"])
def test_texts_depend_on_seed_and_case_only_not_on_batch_mates(model_and_tokenizer, style):
    together = evaluate(model_and_tokenizer, [case(1), case(2), case(3)], style=style)
    alone = evaluate(model_and_tokenizer, [case(2)], style=style)
    assert alone[0] == together[1]
    assert together[0]["fluency"]["text"] != together[1]["fluency"]["text"]  # another case, another stream
    other_seed = evaluate(model_and_tokenizer, [case(2)], seed=1, style=style)
    assert other_seed[0]["fluency"]["text"] != alone[0]["fluency"]["text"]


def test_by_default_each_text_is_sampled_as_romes_evaluation_samples_it(model_and_tokenizer):
    """ROME's `generate_fast(..., max_out_len=100)`: each text grows to 100 tokens counting its prompt
    (`sample_each_to_length_like_rome`, tested against ROME's loop below), from its own seed; a prompt as long as that
    is returned as it is."""
    model, tokenizer = model_and_tokenizer
    prompts = ("The capital of France is", "Toyota is a company " * 30)
    metrics = GenerationMetrics(seed=3)
    (got,) = metrics.evaluate(model, tokenizer, None, [case(7, prompts)])
    expected = [sample_each_to_length_like_rome(model, tokenizer, [prompt], total_tokens=100, seeds=[text_seed(3, 7, i)])[0]
                for i, prompt in enumerate(prompts)]
    assert got["fluency"]["text"] == expected and expected[1] == prompts[1]
    assert len(tokenizer(expected[0])["input_ids"]) > len(tokenizer(prompts[0])["input_ids"]) + 50


def romes_loop(model, tokenizer, prompt: str, total_tokens: int, seed: int) -> str:
    """ROME's `generate_fast` for one prompt, written out: the whole text fed at every step, no cache, no padding."""
    generator, ids = torch.Generator().manual_seed(seed), torch.tensor([tokenizer(prompt)["input_ids"]])
    while ids.shape[1] < total_tokens:
        with torch.no_grad():
            probs = model(input_ids=ids).logits[:, -1].float().softmax(dim=-1)
        top = probs.topk(5, dim=-1)
        pick = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=generator)
        ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
    return unicodedata.normalize("NFKD", tokenizer.decode(ids[0], skip_special_tokens=True)).replace("\n\n", " ")


@pytest.mark.parametrize("family", FAMILIES)
def test_texts_batched_with_left_padding_are_the_texts_each_prompt_gets_alone(family):
    """Prompts of 1 to 41 tokens in one batch: each text is what ROME's loop draws for its prompt alone from its seed
    (a prompt longer than the total, in a batch, is in the test above). The total is the tiny models' 128 positions,
    so a row that kept taking tokens after reaching it (or counted its left padding as positions) would pass the last
    position. float64 weights keep padding's rounding away from the draws."""
    model, tokenizer = make_model(family, dtype=torch.float64), make_tokenizer()
    prompts, total, seeds = ["The", "The capital of France is", "Toyota is a company " * 5], 128, [11, 12, 13]
    got = sample_each_to_length_like_rome(model, tokenizer, prompts, total_tokens=total, seeds=seeds)
    assert [len(tokenizer(p)["input_ids"]) for p in prompts] == [1, 6, 41]
    assert got == [romes_loop(model, tokenizer, p, total, s) for p, s in zip(prompts, seeds)]


def test_a_prompt_that_has_its_length_is_never_fed_beside_one_that_grows():
    """A prompt of 321 tokens beside "The" on gpt2 (128 learned positions), to 100 tokens: it comes back as it is, and
    only "The" runs through the model (the long one would pass the last position); one seed per prompt is checked."""
    model, tokenizer = make_model("gpt2", dtype=torch.float64), make_tokenizer()
    prompts = ["The", "Toyota is a company " * 40]
    assert len(tokenizer(prompts[1])["input_ids"]) > 128
    got = sample_each_to_length_like_rome(model, tokenizer, prompts, total_tokens=100, seeds=[5, 6])
    assert got == [romes_loop(model, tokenizer, "The", 100, 5), prompts[1]]
    # the long prompt first: a growing row draws from its own prompt's stream, not from its place among growing rows
    assert sample_each_to_length_like_rome(model, tokenizer, prompts[::-1], total_tokens=100, seeds=[6, 5]) == got[::-1]
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        sample_each_to_length_like_rome(model, tokenizer, prompts, total_tokens=100, seeds=[5])


def test_a_text_depends_on_its_case_and_place_only(model_and_tokenizer):
    """Reference-style texts are sampled many rows at a time; a text is the same in rows of 1 or 16, and with fewer
    prompts per case; other cases and places get other streams."""
    cases = [case(1), case(2), case(3)]
    wide = evaluate(model_and_tokenizer, cases)
    assert evaluate(model_and_tokenizer, cases, batch_size=1) == wide
    first = evaluate(model_and_tokenizer, cases, prompts_per_case=1)
    assert [r["fluency"]["text"] for r in first] == [r["fluency"]["text"][:1] for r in wide]
    assert len({text for r in wide for text in r["fluency"]["text"]}) == 6
    assert len({text_seed(0, c, i) for c in (1, 12, "1a") for i in (0, 1)} | {text_seed(1, 1, 0)}) == 7
    assert text_seed(0, 12, 1) == text_seed(0, "12", 1)
    # unedited scores cached when a case's texts shared one stream are not these texts'; fixed-style ones still are
    assert GenerationMetrics(0).identity()["streams"] == "text"
    assert "streams" not in GenerationMetrics(0, style="fixed").identity()


def test_reference_texts_are_sampled_batch_size_rows_at_a_time(model_and_tokenizer, monkeypatch):
    """`eval.generation_batch_size` rows per call (each row's KV cache costs memory), the cases' prompts in order, each
    with its case's and place's seed."""
    calls = []
    sample = generation_metrics.sample_each_to_length_like_rome

    def recorded(model, tokenizer, prompts, **settings):
        calls.append((prompts, settings["seeds"]))
        return sample(model, tokenizer, prompts, **settings)

    monkeypatch.setattr(generation_metrics, "sample_each_to_length_like_rome", recorded)
    evaluate(model_and_tokenizer, [case(1), case(2), case(3)], batch_size=4, length=8)
    assert [len(prompts) for prompts, _ in calls] == [4, 2]
    assert [seed for _, seeds in calls for seed in seeds] == [text_seed(0, c, i) for c in (1, 2, 3) for i in (0, 1)]
    assert GenerationMetrics.from_config(compose_config(["eval.generation_batch_size=5"])).batch_size == 5


def test_fixed_style_continues_each_prompt_by_its_length_from_the_models_top_5(model_and_tokenizer, monkeypatch):
    """`generation_length` new tokens, each among the model's 5 most likely next tokens (teacher-forced on the
    sampled row alone); the tiny model's flat distribution makes wider sampling leave the top 5 within 12 tokens."""
    model, tokenizer = model_and_tokenizer
    calls = []
    generate = model.generate

    def recorded(**kwargs):
        calls.append((kwargs["attention_mask"], generate(**kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(model, "generate", recorded)
    evaluate(model_and_tokenizer, [case(1)], length=12, style="fixed")
    ((mask, out),) = calls
    assert out.shape == (2, mask.shape[1] + 12)
    for row, row_mask in zip(out, mask):
        ids = row[int((row_mask == 0).sum()):]  # without the left padding
        prompt_length = int(row_mask.sum())
        with torch.no_grad():
            top5 = model(input_ids=ids[None]).logits[0, prompt_length - 1 : -1].topk(5).indices
        assert (top5 == ids[prompt_length:, None]).any(dim=1).all()


def test_case_seeds_depend_on_the_whole_case_id_and_not_on_its_type():
    """A case keeps its texts when its id is read back as a string, and ids that share a prefix (1, 12) or a run seed
    do not share a random stream."""
    assert len({case_seed(0, case_id) for case_id in (1, 12, 123, "1a")} | {case_seed(1, 12)}) == 5
    assert case_seed(0, 12) == case_seed(0, "12") and 0 <= case_seed(0, 12) < 2**64


def test_fluency_is_the_entropy_of_each_text_of_the_first_prompts(model_and_tokenizer):
    prompts = ("The capital of France is", "Toyota is a company", "The city of London")
    two, every = (evaluate(model_and_tokenizer, [case(1, prompts)], prompts_per_case=k)[0]["fluency"] for k in (2, None))
    assert len(two["text"]) == 2 and len(every["text"]) == 3
    assert [t.startswith(p) for t, p in zip(every["text"], prompts)] == [True] * 3  # texts keep their prompt
    assert two["per_text"] == [ngram_entropy(t) for t in two["text"]]
    assert two["value"] == [pytest.approx(sum(two["per_text"]) / 2)]  # one value per case, as the reference's


def test_an_eos_the_model_draws_is_left_out_of_the_text_fluency_scores(model_and_tokenizer):
    """ROME's and the SADR repo's `generate_fast` delete "<|endoftext|>" from a text before its n-gram entropy. A model
    that draws only EOS after "The cat sat." is scored on the prompt alone, The cat sat . : 3 distinct bigrams
    (log2 3 bits), 2 distinct trigrams (1 bit), FL = (log2 3 · 2/3 + 1 · 4/3) / 2 = 1.19499; the EOS tokens left in
    would add n-grams of "<", "|", "endoftext" (2.63 here)."""
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id

    def only_eos(_module, _inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., eos] = 0.0
        return forced

    hook = model.get_output_embeddings().register_forward_hook(only_eos)
    try:
        got = evaluate(model_and_tokenizer, [case(1, prompts=("The cat sat.",))])[0]["fluency"]
    finally:
        hook.remove()
    assert got["text"] == ["The cat sat."]
    assert got["value"] == [pytest.approx((np.log2(3) * 2 / 3 + 4 / 3) / 2)]


def test_fl_and_its_ci_count_cases_not_texts(tiny_dir, tmp_path):
    """ROME's and the SADR repo's FL is each case's mean entropy, averaged over cases (examples/summrize.py of the SADR
    repo takes its 95 % CI over those case means): both protocols then give that mean, n and CI."""
    overrides = tiny_overrides(tiny_dir, tmp_path / "run", "dataset=counterfact",
                               f"dataset.path={FIXTURES / 'counterfact.json'}", "dataset.limit=2", "eval.generation=true",
                               "eval.generation_length=30", "eval.metrics=[efficacy]", "eval.drift=false")
    out = run_experiment(composed(overrides))
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    case_means = [100 * np.mean(row["edited"]["fluency"]["per_text"]) for row in rows]
    table = pd.read_csv(out / "metrics.csv")
    for protocol in ("prompt", "case"):
        fl = table[(table.label == "FL") & (table.state == "edited") & (table.protocol == protocol)]
        assert fl["n"].item() == 2 and fl["mean"].item() == pytest.approx(np.mean(case_means))
        assert fl["ci95"].item() == pytest.approx(1.96 * np.std(case_means, ddof=1) / np.sqrt(2))


def test_cases_without_generation_prompts_get_no_entries(model_and_tokenizer):
    assert evaluate(model_and_tokenizer, [case(1, prompts=())]) == [{}]


def test_consistency_is_left_out_and_logged_once_when_not_configured(model_and_tokenizer, caplog):
    metrics = GenerationMetrics(seed=0, length=4)
    with caplog.at_level(logging.WARNING, logger="sadr.evaluation.generation_metrics"):
        for _ in range(2):
            results = metrics.evaluate(*model_and_tokenizer, None, [case(1), case(2)])
            assert all("consistency" not in r and "fluency" in r for r in results)
    assert [r.getMessage() for r in caplog.records] == [
        "consistency is not computed: eval.consistency_dir is not set (a folder with ROME's attribute_snippets.json, "
        "idf.npy and tfidf_vocab.json; add eval.consistency_download=true to fetch them, ~1 GB)"
    ]


def test_consistency_is_left_out_with_the_reason_when_files_are_missing(model_and_tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sadr.evaluation.generation_metrics"):
        results = evaluate(model_and_tokenizer, [case(1)], consistency_dir=str(tmp_path))
    assert "consistency" not in results[0]
    assert "idf.npy, tfidf_vocab.json, attribute_snippets.json not found in" in caplog.text


def test_consistency_scores_the_joined_texts_against_the_snippets(model_and_tokenizer, tmp_path):
    write_tfidf_files(tmp_path, "P1", "Q7")
    data = load_consistency_data(tmp_path)
    got = evaluate(model_and_tokenizer, [case(1), case(2, relation="P9"), case(3, target=None)],
                   consistency_dir=str(tmp_path))
    texts = got[0]["fluency"]["text"]
    assert got[0]["consistency"] == {"value": [pytest.approx(data.score(texts, "P1", "Q7"))]}
    assert got[0]["consistency"]["value"][0] > 0  # the prompts themselves share words with the snippets
    assert "consistency" not in got[1] and "consistency" not in got[2]  # no snippets / no target id: no number


def test_identity_names_every_setting_and_whether_consistency_is_available(tmp_path):
    write_tfidf_files(tmp_path, "P1", "Q7")
    base = GenerationMetrics(seed=0).identity()
    assert base["consistency"] is False and (base["length"], base["style"], base["top_k"]) == (100, "reference", 5)
    assert GenerationMetrics(seed=0, consistency_dir=str(tmp_path)).identity()["consistency"] is True
    for changed in (GenerationMetrics(seed=1), GenerationMetrics(seed=0, prompts_per_case=None),
                    GenerationMetrics(seed=0, length=50), GenerationMetrics(seed=0, style="fixed")):
        assert changed.identity() != base
    assert GenerationMetrics(seed=0, batch_size=1).identity() == base  # only how many texts are sampled side by side


@pytest.mark.parametrize(("settings", "message"), [
    (dict(prompts_per_case=0), r"eval.generation_prompts_per_case=0: must be >= 1, or null for all"),
    (dict(length=0), r"eval.generation_length=0: must be >= 1"),
    (dict(style="rome"), r"eval.generation_style must be fixed or reference, got 'rome'"),
    (dict(batch_size=0), r"eval.generation_batch_size=0: must be >= 1"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationMetrics(seed=0, **settings)


@pytest.mark.parametrize("style", ["reference", "fixed"])
def test_run_reports_fluency_and_consistency_columns(tiny_dir, tmp_path, style):
    """The unedited model's texts are the ones its sampler draws for the configured style and length, from the case's
    seed (the tiny llama saved in tiny_dir is make_model("llama"))."""
    tfidf = tmp_path / "tfidf"
    tfidf.mkdir()
    write_tfidf_files(tfidf, "P103", "Q9001")  # case 100 of the CounterFact fixture
    overrides = tiny_overrides(tiny_dir, tmp_path / "run", "dataset=counterfact",
                               f"dataset.path={FIXTURES / 'counterfact.json'}", "dataset.limit=1", "eval.generation=true",
                               "eval.generation_length=30", f"eval.generation_style={style}",
                               f"eval.consistency_dir={tfidf}")
    out = run_experiment(composed(overrides))
    row = json.loads((out / "cases.jsonl").read_text().splitlines()[0])
    data = load_consistency_data(tfidf)
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompts = [record["generation_prompts"][:2] for record in json.loads((FIXTURES / "counterfact.json").read_text())
               if record["case_id"] == row["case_id"]][0]
    case_id = row["case_id"]  # the run's seed is 0
    expected = (sample_each_to_length_like_rome(model, tokenizer, prompts, total_tokens=30,
                                                seeds=[text_seed(0, case_id, i) for i in range(2)])
                if style == "reference" else sample_texts(model, tokenizer, prompts, max_new_tokens=30,
                                                          seed=case_seed(0, case_id)))
    assert row["unedited"]["fluency"]["text"] == expected
    for state in ("edited", "unedited"):
        texts = row[state]["fluency"]["text"]
        assert len(texts) == 2  # eval.generation_prompts_per_case defaults to 2
        assert row[state]["consistency"]["value"] == [pytest.approx(data.score(texts, "P103", "Q9001"))]
    table = pd.read_csv(out / "metrics.csv")
    fl = table[(table.label == "FL") & (table.state == "edited") & (table.protocol == "prompt")]
    assert fl["mean"].item() == pytest.approx(100 * np.mean(row["edited"]["fluency"]["value"]))
    assert set(table[table.label == "Cons"].protocol) == {"prompt", "case"}


def test_generation_is_off_by_default(tiny_dir, tmp_path):
    """Sampling two 100-token texts costs ~5 s per case on 2 CPU cores (SmolLM2-135M), so fluency is asked for."""
    out = run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1")))
    row = json.loads((out / "cases.jsonl").read_text().splitlines()[0])
    assert "fluency" not in row["edited"] and "efficacy" in row["edited"]
