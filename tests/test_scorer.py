import torch

from sadr.evaluation.scorer import score_pairs_detailed


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


def test_pairs_sharing_a_prompt_are_read_from_one_row_and_score_as_alone(tiny_model, tokenizer):
    """A single-token target is read from the row of a longer target after the same prompt; a longer target that the
    other row does not begin needs its own row; pairs of different cases never share. Every score is the pair's own."""
    from sadr.evaluation.scorer import shared_rows
    from sadr.models.tokenization import encode_prompt_target

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
