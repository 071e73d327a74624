import math

import pytest
import torch

from sadr.evaluation.scorer import score_pairs_detailed
from sadr.models.tokenization import encode_prompt_target
from tests.tiny_models import make_model, make_sentencepiece_tokenizer


def _one_at_a_time(model, tokenizer, prompt, target):
    """Reference: full-vocabulary logits of the unpadded text, a Python loop over target tokens."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(f"{prompt} {target}")["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    total, correct = 0.0, 0
    for i in range(len(prompt_ids), len(full_ids)):
        total += logprobs[i - 1, full_ids[i]].item()
        correct += int(logprobs[i - 1].argmax().item() == full_ids[i])
    n = len(full_ids) - len(prompt_ids)
    return -total / n, correct / n


def test_batched_scores_match_one_example_at_a_time(tiny_model, tokenizer):
    prompts = ["The capital of France is", "Toyota is a company based in", "I", "Because the city of London is in"]
    targets = ["Paris", "Japan and America", "said", "England"]
    got = score_pairs_detailed(tiny_model, tokenizer, prompts, targets, batch_size=3)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        nll, acc = _one_at_a_time(tiny_model, tokenizer, p, t)
        assert abs(got.nll[i].item() - nll) < 1e-4
        assert abs(got.token_accuracy[i].item() - acc) < 1e-9
    torch.testing.assert_close(got.prob, torch.exp(-got.nll))


def test_prompts_and_targets_of_different_counts_are_refused(tokenizer):
    """zip would score the first pairs and drop the rest silently, shifting every score after a missing target."""
    with pytest.raises(ValueError, match=r"^2 prompts but 1 targets$"):
        score_pairs_detailed(make_model("llama"), tokenizer, ["The capital of France is", "I"], ["Paris"])


def test_pairs_sharing_a_prompt_are_read_from_one_row_and_score_as_alone(tiny_model, tokenizer):
    """A single-token target is read from the row of a longer target after the same prompt; a longer target that the
    other row does not begin needs its own row; pairs of different cases never share. Every score is the pair's own."""
    from sadr.evaluation.scorer import shared_rows
    prompt = "The capital of France is"
    one_token = next(t for t in ("Paris", "is", "The", "I") if len(encode_prompt_target(tokenizer, prompt, t).target_ids) == 1)
    prompts = [prompt, prompt, prompt, prompt, "I"]
    targets = [one_token, "Japan and America", "London is in England", one_token, "said"]
    cases = [0, 0, 0, 1, 1]
    pairs = [encode_prompt_target(tokenizer, p, t) for p, t in zip(prompts, targets)]
    rows, row_of = shared_rows(pairs, cases)
    assert len(rows) == 4 and row_of[0] in (row_of[1], row_of[2]) and row_of[1] != row_of[2]
    assert row_of[3] != row_of[0] and [rows[r][0] for r in row_of] == cases
    got = score_pairs_detailed(tiny_model, tokenizer, prompts, targets, batch_size=2, pair_cases=cases)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        nll, acc = _one_at_a_time(tiny_model, tokenizer, p, t)
        assert abs(got.nll[i].item() - nll) < 1e-4
        assert abs(got.token_accuracy[i].item() - acc) < 1e-9


def test_commonsense_values_are_each_questions_own_comparison(tiny_model, tokenizer):
    """CS and DCS per question, through `evaluate_cases`, against the reference above: p = exp(−mean nll) of the right
    and of the wrong continuation, after the question alone and after the edit sentence."""
    from sadr.data.records import ContrastPrompt, EditCase, EditRequest
    from sadr.evaluation.probes import resolve_metrics
    from sadr.evaluation.prompt_metrics import evaluate_cases

    questions = (ContrastPrompt("How do I dry a wet shoe?", "Stuff it with paper.", "Stuff it with ice."),
                 ContrastPrompt("Keep bread fresh longer.", "Store it in a cloth bag.", "Store it in a wet bag."))
    case = EditCase(0, EditRequest("{} is in", "Toyota", "France", "Japan"), commonsense_prompts=questions)
    got = evaluate_cases(tiny_model, tokenizer, [case], resolve_metrics(["commonsense", "distract_commonsense"]),
                         batch_size=3)[0]
    for name, before in (("commonsense", ""), ("distract_commonsense", "Toyota is in France. ")):
        for i, question in enumerate(questions):
            right, wrong = (math.exp(-_one_at_a_time(tiny_model, tokenizer, before + question.prompt, answer)[0])
                            for answer in (question.right, question.wrong))
            assert got[name]["p_good"][i] == pytest.approx(right, rel=1e-4)
            assert got[name]["p_bad"][i] == pytest.approx(wrong, rel=1e-4)
            assert got[name]["value"][i] == float(right > wrong)


# Prompts after which, for each tiny model family, the greedy continuation re-tokenises as itself (see below).
GREEDY_PROMPTS = ("France is Paris. The", "England", "America. The mother tongue of", "The capital of France is",
                  "São Paulo is", "city of", "based in")
WRONG_WORDS = (" Paris", " Rome")


def _greedy_targets(model, tokenizer):
    """A prompt, the model's 3-token greedy continuation of it (each top-1 by a clear margin, one plain forward per
    token) and a single-token word that is never that top-1, such that every target built from them below is
    tokenised by the scorer into exactly these tokens."""
    for prompt in GREEDY_PROMPTS:
        greedy = []
        for _ in range(3):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"] + greedy])).logits[0, -1]
            top = logits.topk(2).values
            if top[0] - top[1] < 1e-3:
                break
            greedy.append(int(logits.argmax()))
        if len(greedy) < 3:
            continue
        wrong = next(w for w in WRONG_WORDS if tokenizer(w)["input_ids"][0] not in greedy)
        wrong_id = tokenizer(wrong)["input_ids"]
        texts = [tokenizer.decode(greedy[:k]) for k in (1, 2, 3)]
        if not texts[0].startswith(" "):
            continue
        texts = [text[1:] for text in texts]  # the scorer (and `_one_at_a_time`) put the space back
        wanted = {texts[2]: greedy, texts[1]: greedy[:2], texts[0] + wrong: greedy[:1] + wrong_id,
                  texts[1] + wrong: greedy[:2] + wrong_id, wrong[1:]: wrong_id}
        if len(wrong_id) == 1 and all(encode_prompt_target(tokenizer, prompt, text).target_ids == ids
                                      for text, ids in wanted.items()):
            return prompt, texts, wrong
    raise AssertionError("no candidate prompt has a greedy continuation that re-tokenises as itself")


def test_token_accuracy_is_the_fraction_of_target_tokens_the_model_predicts(tiny_model, tokenizer):
    """On the model's own greedy continuation every token is the top-1, so accuracies are 1, 1/2, 2/3 or 0 by hand, not
    0 everywhere as for the random targets above; in shared rows and batches every pair gets its own fraction."""
    prompt, (one, two, three), wrong = _greedy_targets(tiny_model, tokenizer)
    prompts = [prompt] * 5 + ["I"]
    targets = [three, two, one + wrong, two + wrong, wrong[1:], "said"]
    expected = [1.0, 1.0, 1 / 2, 2 / 3, 0.0, _one_at_a_time(tiny_model, tokenizer, "I", "said")[1]]
    for batch_size in (1, 3, 64):
        got = score_pairs_detailed(tiny_model, tokenizer, prompts, targets, batch_size=batch_size)
        assert got.token_accuracy.tolist() == pytest.approx(expected, abs=1e-6)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            nll, acc = _one_at_a_time(tiny_model, tokenizer, p, t)
            assert acc == pytest.approx(expected[i], abs=1e-9)
            assert abs(got.nll[i].item() - nll) < 1e-4


@pytest.mark.parametrize("legacy", [False, True], ids=["metaspace", "legacy"])
def test_sentencepiece_scores_match_one_example_at_a_time(legacy):
    """Llama-2's kind of tokenizer: byte-fallback targets ("▁" then bytes), one-piece and many-piece targets after
    one prompt (read from a shared row), a BOS before every row; zsRE's token accuracy is over the same tokens."""
    tokenizer = make_sentencepiece_tokenizer(legacy)
    model = make_model("llama", tokenizer=tokenizer)
    prompts = ["The capital of France is"] * 3 + ["Zoë lives in"]
    targets = ["Zürich", "Paris", "Zürich is in Switzerland", "北京"]
    got = score_pairs_detailed(model, tokenizer, prompts, targets)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        nll, acc = _one_at_a_time(model, tokenizer, p, t)
        assert abs(got.nll[i].item() - nll) < 1e-4
        assert abs(got.token_accuracy[i].item() - acc) < 1e-9
