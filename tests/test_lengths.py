"""Every text a run puts through the model fits the model's positions (sadr/data/lengths.py): the edit prompt that
δ is optimised on, and what the run's evaluators declare they score or sample from (`Evaluator.inputs`)."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from sadr.data.lengths import EDIT_PROMPT, GENERATION_PROMPTS, check_prompt_lengths, generated_after_prompt
from sadr.data.records import ContrastPrompt, EditCase, EditRequest, LabeledPrompt
from sadr.errors import InvalidSettingError
from sadr.evaluation import prompt_metrics
from sadr.evaluation.generation_metrics import GenerationMetrics
from sadr.evaluation.probes import METRICS, resolve_metrics
from sadr.evaluation.suite import PromptMetrics
from tests.tiny_models import make_sentencepiece_tokenizer

EVERY_METRIC = [PromptMetrics(list(METRICS.values()))]
EVERYTHING = [*EVERY_METRIC, GenerationMetrics(seed=0, prompts_per_case=None)]


def bytes_with_bos(texts):
    """A tokenizer giving a BOS and one token per byte, the most the check's byte bound allows: a text of n bytes is
    n + 1 tokens."""
    return SimpleNamespace(input_ids=[[0, *text.encode()] for text in texts])


def paris(**fields) -> EditCase:
    request = fields.pop("request", EditRequest(prompt="{} is in", subject="Paris", target_new="Rome"))
    return EditCase(case_id=7, request=request, **fields)


def test_a_prompt_longer_than_the_model_s_positions_is_named_before_any_work(tokenizer):
    from sadr.data.load import load_cases
    from tests.data_fixtures import config

    cases = load_cases(config("counterfact"), "unused").cases
    added = {EDIT_PROMPT: 10}
    check_prompt_lengths(cases, EVERYTHING, tokenizer, 128, added)
    long = replace(cases[1], neighborhood_prompts=("word " * 200 + "is in",))
    with pytest.raises(InvalidSettingError, match=r"^case 101: a prompt of neighborhood_prompts needs \d+ tokens with "
                                                  r"its answer, more than the model's 128 positions"):
        check_prompt_lengths([cases[0], long], EVERYTHING, tokenizer, 128, added)
    with pytest.raises(InvalidSettingError, match=r"requested_rewrite\.prompt needs \d+ tokens with its answer and a "
                                                  r"context template"):
        check_prompt_lengths(cases, EVERYTHING, tokenizer, len(tokenizer(cases[0].request.text).input_ids) + 2, added)
    generation = max(len(tokenizer(prompt).input_ids) for case in cases for prompt in case.generation_prompts)
    check_prompt_lengths(cases, EVERYTHING, tokenizer, generation + 100, {GENERATION_PROMPTS: 100})
    with pytest.raises(InvalidSettingError, match=r"generation_prompts needs \d+ tokens and the sampled tokens, more "):
        check_prompt_lengths(cases, EVERYTHING, tokenizer, generation + 99, {GENERATION_PROMPTS: 100})


def test_the_prompt_length_check_bounds_tokens_by_bytes_and_counts_every_field():
    """The true answer is the longer one where it is; a non-ASCII character is two tokens; portability prompts are
    scored with their answers too."""
    # "Paris is in Rome": 16 bytes, 17 tokens
    check_prompt_lengths([paris()], EVERYTHING, bytes_with_bos, 17, {})
    check_prompt_lengths([paris()], EVERYTHING, bytes_with_bos, None, {})  # a model without a number of positions
    with pytest.raises(InvalidSettingError, match=r"^case 7: a prompt of requested_rewrite\.prompt needs 17 tokens "
                                                  r"with its answer, more than the model's 16 positions"):
        check_prompt_lengths([paris()], EVERYTHING, bytes_with_bos, 16, {})
    # "Paris is in the United Kingdom": 30 bytes, 31 tokens, though the new target "Rome" makes 17
    longer_true = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="the United Kingdom")
    with pytest.raises(InvalidSettingError, match=r"requested_rewrite\.prompt needs 31 tokens with its answer, more "
                                                  r"than the model's 30 positions"):
        check_prompt_lengths([paris(request=longer_true)], EVERYTHING, bytes_with_bos, 30, {})
    # ten "é": 10 characters, 20 bytes, 21 tokens
    with pytest.raises(InvalidSettingError, match=r"generation_prompts needs 21 tokens, more than the model's 20 "):
        check_prompt_lengths([paris(generation_prompts=("é" * 10,))], EVERYTHING, bytes_with_bos, 20, {})
    # "The capital of Paris's country is London": 40 bytes, 41 tokens
    reasoning = {"Reasoning": (LabeledPrompt("The capital of Paris's country is", "London"),)}
    check_prompt_lengths([paris(portability=reasoning)], EVERYTHING, bytes_with_bos, 41, {})
    with pytest.raises(InvalidSettingError, match=r"portability needs 41 tokens with its answer, more "):
        check_prompt_lengths([paris(portability=reasoning)], EVERYTHING, bytes_with_bos, 40, {})
    # CS: "Dry a shoe. Stuff it with paper." 32 bytes, 33 tokens (the longer continuation counts); DCS puts the edit
    # sentence "Paris is in Rome. " (18 bytes) before it: 51 tokens; DNS: "Paris is in Rome. Lyon is in Rome", 34 tokens
    question = (ContrastPrompt("Dry a shoe.", "Stuff it with ice.", "Stuff it with paper."),)
    with pytest.raises(InvalidSettingError, match=r"commonsense_prompts needs 33 tokens with its answer, more "):
        check_prompt_lengths([paris(commonsense_prompts=question)], EVERYTHING, bytes_with_bos, 32, {})
    with pytest.raises(InvalidSettingError, match=r"commonsense_prompts \(after the edit sentence\) needs 51 tokens "):
        check_prompt_lengths([paris(commonsense_prompts=question)], EVERYTHING, bytes_with_bos, 50, {})
    check_prompt_lengths([paris(commonsense_prompts=question)], EVERYTHING, bytes_with_bos, 51, {})
    neighbor = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="Gaul")
    with pytest.raises(InvalidSettingError, match=r"neighborhood_prompts \(after the edit sentence\) needs 34 tokens "):
        check_prompt_lengths([paris(request=neighbor, neighborhood_prompts=("Lyon is in",))], EVERYTHING,
                             bytes_with_bos, 33, {})


@pytest.mark.parametrize("specials", [1, 2, 3, 4])
def test_a_text_is_checked_whatever_special_tokens_up_to_four_its_tokenizer_adds(specials):
    """The byte bound counts up to SPECIAL_TOKENS = 4 tokens added around a text: with one token per byte, "Paris is in
    Rome" (16 bytes) is 16 + `specials` tokens, one more than the model's positions, and is not skipped unread."""
    def tokenizer(texts):
        return SimpleNamespace(input_ids=[[0] * specials + list(text.encode()) for text in texts])

    check_prompt_lengths([paris()], EVERYTHING, tokenizer, 16 + specials, {})
    with pytest.raises(InvalidSettingError, match=rf"requested_rewrite\.prompt needs {16 + specials} tokens with its "
                                                  rf"answer, more than the model's {15 + specials} positions"):
        check_prompt_lengths([paris()], EVERYTHING, tokenizer, 15 + specials, {})


@pytest.mark.parametrize("field, prompts, needed", [
    # "Paris lies in Rome": 18 bytes, 19 tokens
    ("paraphrase_prompts", {"paraphrase_prompts": ("Paris lies in",)}, 19),
    # "The currency of Paris is euro": 29 bytes, 30 tokens
    ("relation_prompts", {"relation_prompts": (LabeledPrompt("The currency of Paris is", "euro"),)}, 30),
    # "Paris, which is not Rome, is in Gaul": 36 bytes, 37 tokens
    ("locality_prompts", {"locality_prompts": (LabeledPrompt("Paris, which is not Rome, is in", "Gaul"),)}, 37),
])
def test_paraphrase_relation_and_locality_prompts_are_length_checked_with_their_answers(field, prompts, needed):
    """Each of these prompts, followed by the answer it is scored against, must fit the model's positions too, not
    only the edit prompt ("Paris is in Rome": 17 tokens). A relation prompt is scored against the new target too."""
    request = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="Gaul")
    case = EditCase(case_id=3, request=request, **prompts)
    check_prompt_lengths([case], EVERY_METRIC, bytes_with_bos, needed, {})
    with pytest.raises(InvalidSettingError, match=rf"^case 3: a prompt of {field} needs {needed} tokens with its "
                                                  rf"answer, more than the model's {needed - 1} positions"):
        check_prompt_lengths([case], EVERY_METRIC, bytes_with_bos, needed - 1, {})


def test_only_what_the_run_scores_or_samples_is_length_checked():
    """A metric left out of eval.metrics, a generation prompt past eval.generation_prompts_per_case, or generation
    turned off, cannot stop a run; the drift diagnostics score the DNS prompts even when DNS is not reported."""
    # "Paris is in Rome. Lyon is in Rome": 34 tokens with the edit sentence; "Lyon is in Gaul" alone, 16
    request = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="Gaul")
    case = paris(request=request, neighborhood_prompts=("Lyon is in",))
    neighborhood = resolve_metrics(["neighborhood"])
    check_prompt_lengths([case], [PromptMetrics(neighborhood)], bytes_with_bos, 33, {})
    with pytest.raises(InvalidSettingError, match=r"neighborhood_prompts \(after the edit sentence\) needs 34 tokens"):
        check_prompt_lengths([case], [PromptMetrics(neighborhood, drift=True)], bytes_with_bos, 33, {})
    # δ is optimised on "Paris is in Rome" (17 tokens): the longer true answer counts only where efficacy is scored
    longer_true = paris(request=replace(request, target_true="the United Kingdom"))
    check_prompt_lengths([longer_true], [PromptMetrics(resolve_metrics(["paraphrase"]))], bytes_with_bos, 17, {})
    with pytest.raises(InvalidSettingError, match=r"requested_rewrite\.prompt needs 31 tokens"):
        check_prompt_lengths([longer_true], [PromptMetrics(resolve_metrics(["efficacy"]))], bytes_with_bos, 30, {})
    # the third generation prompt is 31 tokens
    generating = paris(generation_prompts=("Paris", "Rome", "x" * 30))
    for evaluators in ([], [GenerationMetrics(seed=0, prompts_per_case=2)]):
        check_prompt_lengths([generating], evaluators, bytes_with_bos, 30, {GENERATION_PROMPTS: 0})
    with pytest.raises(InvalidSettingError, match=r"generation_prompts needs 31 tokens"):
        check_prompt_lengths([generating], [GenerationMetrics(seed=0, prompts_per_case=3)], bytes_with_bos, 30, {})


def test_an_answer_with_fewer_characters_but_more_tokens_is_length_checked():
    """After byte fallback "北京" (2 characters) is 7 tokens and "Paris" (5) 3: the longer text in tokens is the one
    with fewer characters, so both answers are checked."""
    tok = make_sentencepiece_tokenizer()
    case = paris(request=EditRequest(prompt="{} is in", subject="Nice", target_new="北京", target_true="Paris"),
                 neighborhood_prompts=("The city of Lyon is in",))
    needed = len(tok("The city of Lyon is in 北京").input_ids)
    assert needed > len(tok("The city of Lyon is in Paris").input_ids)
    neighborhood = [PromptMetrics([METRICS["neighborhood"]])]
    check_prompt_lengths([case], neighborhood, tok, needed, {})
    with pytest.raises(InvalidSettingError, match=rf"neighborhood_prompts needs {needed} tokens with its answer"):
        check_prompt_lengths([case], neighborhood, tok, needed - 1, {})


@pytest.mark.parametrize("drift", [False, True])
def test_the_texts_declared_are_the_pairs_the_scorer_gets(monkeypatch, drift):
    """Every (prompt, answer) pair that prompt_metrics hands the scorer, for every metric, is declared to the length
    check, and nothing else is declared."""
    compared = paris(
        request=EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="the United Kingdom"),
        paraphrase_prompts=("Paris lies in",), neighborhood_prompts=("Lyon is in", "Nice is in"),
        relation_prompts=(LabeledPrompt("The currency of Paris is", "the euro"),),
        locality_prompts=(LabeledPrompt("Paris, which is not Rome, is in", "Gaul"),),
        portability={"Reasoning": (LabeledPrompt("The capital of Paris's country is", "London"),)},
        commonsense_prompts=(ContrastPrompt("Dry a shoe.", "Stuff it with ice.", "Stuff it with paper."),))
    token_scored = EditCase(case_id=8, request=EditRequest(prompt="{} plays", subject="Ann", target_new="the harp"),
                            paraphrase_prompts=("Ann's instrument is",), token_scored=True)
    scored = []

    def scorer(model, tokenizer, prompts, targets, batch_size, **kwargs):
        scored.extend(zip(prompts, targets))
        return SimpleNamespace(prob=torch.zeros(len(prompts)), token_accuracy=torch.zeros(len(prompts)))

    monkeypatch.setattr(prompt_metrics, "score_pairs_detailed", scorer)
    monkeypatch.setattr(prompt_metrics, "SubjectAttentionReader", lambda *args: None)
    monkeypatch.setattr(prompt_metrics, "drift_read_positions", lambda *args: None)
    metrics = [m for m in METRICS.values() if m.name != "distract_neighborhood"]
    evaluator = PromptMetrics(metrics, drift=drift)
    prompt_metrics.evaluate_cases(None, None, [compared, token_scored], metrics,
                                  drift_adapter=object() if drift else None)
    declared = [text for case in (compared, token_scored) for _, text in evaluator.inputs(case)]
    assert len(declared) > 10
    assert sorted(declared) == sorted(f"{prompt} {answer}" for prompt, answer in scored)
    assert any("Lyon is in" in text and text.startswith("Paris is in Rome.") for text in declared) == drift


@pytest.mark.parametrize("generation, style, length, positions, sampled", [
    (False, "fixed", 100, 128, 0),  # no fluency: nothing is sampled after a generation prompt
    (True, "fixed", 130, 128, 130),  # counted with each prompt by check_prompt_lengths
    (True, "reference", 128, 128, 0),  # each text grows to 128 tokens in all, whatever its prompt: it fits
    (True, "reference", 500, None, 0),  # a model that gives no number of positions: no bound
])
def test_the_tokens_sampled_after_a_generation_prompt_depend_on_the_style(generation, style, length, positions,
                                                                          sampled):
    """What check_prompt_lengths adds to each generation prompt (a reference-style length longer than the model's
    positions is refused: tests/test_run.py)."""
    from sadr.conf.schema import EvalConfig, SamplingStyle

    eval_cfg = EvalConfig(generation=generation, generation_style=SamplingStyle[style], generation_length=length)
    assert generated_after_prompt(eval_cfg, positions) == sampled
