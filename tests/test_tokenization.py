import pytest
import torch

from sadr.models.tokenization import (
    SubjectNotFoundError,
    encode_prompt_target,
    encode_with_offsets,
    fill_subject,
    last_token_of_span,
    pad_batch,
    pad_id_of,
)
from sadr.data.records import EditRequest
from sadr.editors.prompts import encode_delta_prompts, encode_subject_prompts, stack_delta_prompts
from tests.tiny_models import make_sentencepiece_tokenizer, make_tokenizer

LEGACY = pytest.mark.parametrize("legacy", [False, True], ids=["metaspace", "legacy"])


def test_prompt_and_target_ids_concatenate_to_the_full_text(tokenizer):
    pair = encode_prompt_target(tokenizer, "The capital of France is", "Paris")
    full = tokenizer("The capital of France is Paris")["input_ids"]
    assert pair.prompt_ids + pair.target_ids == full
    assert tokenizer.decode(pair.target_ids) == " Paris"


def test_subject_last_token_found_from_offsets(tokenizer):
    text, span = fill_subject("The mother tongue of {} is", "Danielle Darrieux")
    ids, offsets = encode_with_offsets(tokenizer, text)
    index = last_token_of_span(offsets, span)
    assert tokenizer.decode(ids[: index + 1]).endswith("Darrieux")
    assert not tokenizer.decode(ids[: index]).endswith("Darrieux")


@pytest.mark.parametrize("subject", ["Danielle Darrieux ", " Danielle Darrieux", "Danielle Darrieux\n"])
def test_whitespace_around_the_subject_is_not_its_last_token(tokenizer, subject):
    text, span = fill_subject("The mother tongue of {} is", subject)
    ids, offsets = encode_with_offsets(tokenizer, text)
    assert tokenizer.decode(ids[: last_token_of_span(offsets, span) + 1]).endswith("Darrieux")


def test_subject_positions_survive_a_bos_token(tokenizer):
    """A tokenizer that prepends BOS must not shift the subject position by one."""
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    text, span = fill_subject("{} is located in", "The Eiffel Tower")
    ids, offsets = encode_with_offsets(tokenizer, text)
    assert ids[0] == 0
    index = last_token_of_span(offsets, span)
    assert tokenizer.decode(ids[1 : index + 1]).strip() == "The Eiffel Tower"


def test_a_span_no_token_covers_is_an_error():
    with pytest.raises(SubjectNotFoundError, match=r"no token covers characters 10\.\.12"):
        last_token_of_span([(0, 5), (5, 9)], (10, 12))


def test_template_must_have_one_placeholder():
    with pytest.raises(ValueError, match="exactly once"):
        fill_subject("no placeholder", "x")


def test_a_target_that_starts_with_a_space_gets_no_second_one(tokenizer):
    plain = encode_prompt_target(tokenizer, "The capital of France is", "Paris")
    spaced = encode_prompt_target(tokenizer, "The capital of France is", " Paris")
    assert (spaced.prompt_ids, spaced.target_ids) == (plain.prompt_ids, plain.target_ids)
    with pytest.raises(ValueError, match="empty target"):
        encode_prompt_target(tokenizer, "The capital of France is", " ")


def test_a_multi_token_target_starts_at_its_leading_space(tokenizer):
    """The target's first token carries the space (" D" of " Danielle"): it belongs to the target, not the prompt."""
    prompt = "The mother tongue of Max is"
    pair = encode_prompt_target(tokenizer, prompt, "Danielle Darrieux")
    full = tokenizer(prompt, return_offsets_mapping=True)
    assert pair.prompt_ids == full["input_ids"] and pair.prompt_offsets == [tuple(o) for o in full["offset_mapping"]]
    assert tokenizer.decode(pair.target_ids) == " Danielle Darrieux" and len(pair.target_ids) > 1


class GreedyBosTokenizer:
    """Longest match over a fixed vocabulary after a BOS (id 0): "is " can be one token, as some merges make it."""

    vocab = ["<s>", "i", "t", "s", " ", "o", "k", "it", "is ", " ok"]

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        ids, offsets = ([0], [(0, 0)]) if add_special_tokens else ([], [])
        i = 0
        while i < len(text):
            piece = max((v for v in self.vocab[1:] if text.startswith(v, i)), key=len)
            ids.append(self.vocab.index(piece))
            offsets.append((i, i + len(piece)))
            i += len(piece)
        return {"input_ids": ids, "offset_mapping": offsets}


def test_a_token_across_the_prompt_target_boundary_falls_back_to_separate_encodings():
    """In "it is ok" the token "is " straddles the boundary; prompt and " ok" are then encoded on their own, the
    target without a second BOS."""
    vocab = GreedyBosTokenizer.vocab
    pair = encode_prompt_target(GreedyBosTokenizer(), "it is", "ok")
    assert [vocab[i] for i in pair.prompt_ids] == ["<s>", "it", " ", "i", "s"]
    assert [vocab[i] for i in pair.target_ids] == [" ok"]
    assert pair.prompt_offsets == [(0, 0), (0, 2), (2, 3), (3, 4), (4, 5)]


@pytest.mark.parametrize(
    "left, ids, mask",
    [
        (False, [[5, 6, 7], [8, 9, 9]], [[1, 1, 1], [1, 0, 0]]),
        (True, [[5, 6, 7], [9, 9, 8]], [[1, 1, 1], [0, 0, 1]]),
    ],
)
def test_pad_batch_pads_on_the_chosen_side(left, ids, mask):
    """Right padding for scoring, left padding for `generate`; the mask marks exactly the real tokens."""
    batch = pad_batch([[5, 6, 7], [8]], pad_id=9, left=left)
    assert batch.input_ids.tolist() == ids and batch.attention_mask.tolist() == mask


def test_pad_id_of_keeps_a_pad_token_else_takes_eos_then_unk_then_token_0():
    """The documented fallback order; a tokenizer's own pad token is never replaced."""
    own = make_tokenizer(pad=False)
    own.pad_token = "%"
    eos_and_unk = make_tokenizer(pad=False)
    eos_and_unk.unk_token = "!"
    unk_only = make_tokenizer(pad=False)
    unk_only.unk_token, unk_only.eos_token = "!", None
    neither = make_tokenizer(pad=False)
    neither.eos_token = None
    ids = [own.convert_tokens_to_ids(t) for t in ("%", "<|endoftext|>", "!")]
    assert ids == [5, 0, 1]
    assert [pad_id_of(t) for t in (own, eos_and_unk, unk_only, neither)] == [5, 0, 1, 0]


@LEGACY
def test_the_sentencepiece_tokenizer_is_like_llama_2s(legacy):
    tok = make_sentencepiece_tokenizer(legacy)
    ids = tok("Zoë is in 北京")["input_ids"]
    assert tok.pad_token is None and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["▁", "Z"]  # "Zoë" has no piece: "▁" alone, then bytes for "ë"
    assert "<0xC3>" in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "Zoë is in 北京"
    assert tok.convert_ids_to_tokens(tok("The capital")["input_ids"]) == ["<s>", "▁The", "▁capital"]


@LEGACY
@pytest.mark.parametrize("prompt, target, first", [
    ("The capital of France is", "Paris", "▁Pa"),
    ("The capital of France is", " Paris", "▁Pa"),
    ("The city of", "Zürich", "▁Zürich"),
    ("Zoë lives in", "北京", "▁"),  # no "▁北" piece: the model sees "▁" then the bytes, as Llama-2 does
])
def test_sentencepiece_prompt_and_target_ids_are_what_the_model_sees(legacy, prompt, target, first):
    """No stray "▁" before a word's own piece (the reference code's `target_new[1:]` for Llama), no second BOS."""
    tok = make_sentencepiece_tokenizer(legacy)
    pair = encode_prompt_target(tok, prompt, target)
    assert pair.prompt_ids + pair.target_ids == tok(f"{prompt} {target.strip()}")["input_ids"]
    assert pair.prompt_ids == tok(prompt)["input_ids"]
    assert tok.convert_ids_to_tokens(pair.target_ids)[0] == first
    # the decoder drops the space a text starts with, as Llama's does
    assert tok.decode(pair.target_ids) == target.strip()


@LEGACY
def test_a_prompt_ending_with_a_space_gives_its_space_to_the_target_when_sentencepiece_joins_them(legacy):
    """Llama-2's "▁▁" joins the prompt's trailing space and the target's: split before it, the ids are those the
    model sees. Tokenised apart, the legacy tokenizer gave the target a third space ("▁" + "▁▁Ma...")."""
    tok = make_sentencepiece_tokenizer(legacy)
    prompt = "The capital of Spain is "
    pair = encode_prompt_target(tok, prompt, "Madrid")
    assert pair.prompt_ids + pair.target_ids == tok(prompt + " Madrid")["input_ids"]
    assert pair.prompt_ids == tok(prompt.rstrip())["input_ids"]
    assert tok.convert_ids_to_tokens(pair.target_ids)[0] == "▁▁"
    assert tok.decode(pair.prompt_ids + pair.target_ids, skip_special_tokens=True) == prompt + " Madrid"


@LEGACY
@pytest.mark.parametrize("template, subject, last", [
    ("{} is located in", "The Eiffel Tower", "▁Tower"),  # at the start
    ("The mother tongue of {} is", "Danielle Darrieux", "▁Darrieux"),  # in the middle
    ("The city of {}", "Zürich", "▁Zürich"),  # at the end
    ("I love {}", "北京", "<0xAC>"),  # byte fallback: the last byte of "京"
    ("{} is in", "Zoë", "<0xAB>"),  # "▁" alone at the start, then bytes
    ("The capital of {}s is", "France", "▁France"),  # the next piece has no "▁" of its own
    ("The {}ian is", "Ital", "▁Ital"),
])
def test_sentencepiece_subject_positions(legacy, template, subject, last):
    tok = make_sentencepiece_tokenizer(legacy)
    text, span = fill_subject(template, subject)
    ids, offsets = encode_with_offsets(tok, text)
    index = last_token_of_span(offsets, span)
    assert tok.convert_ids_to_tokens(ids[index]) == last
    assert tok.decode(ids[: index + 1], skip_special_tokens=True) == text[: span[1]]
    prompts = encode_subject_prompts(tok, [template], [subject])
    assert prompts.subject_positions.tolist() == [index]


def test_subject_prompts_need_one_subject_per_template():
    """zip would drop the extra templates, and the keys read would be fewer than the prompts given."""
    with pytest.raises(ValueError, match="zip"):
        encode_subject_prompts(make_tokenizer(), ["{} is", "{} was"], ["Paris"])


@LEGACY
def test_sentencepiece_delta_prompts_read_the_subject_the_last_prompt_token_and_each_target_token(legacy):
    tok = make_sentencepiece_tokenizer(legacy)
    request = EditRequest(prompt="The mother tongue of {} is", subject="Zoë Darrieux", target_new="北京")
    delta = encode_delta_prompts(tok, request, ["{}", "The city. {}"])
    target = tok.convert_ids_to_tokens(tok("is 北京")["input_ids"][2:])  # "▁" and six bytes
    for row in range(delta.batch.input_ids.shape[0]):
        ids = delta.batch.input_ids[row][delta.batch.attention_mask[row].bool()].tolist()
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens[0] == "<s>" and tokens.count("<s>") == 1
        assert tokens[delta.subject_positions[row]] == "▁Darrieux"
        assert tokens[delta.last_prompt_positions[row]] == ("▁is" if row < delta.n_rewrite else "▁a")
        rows = delta.target_rows == row
        assert tok.convert_ids_to_tokens(delta.target_ids[rows].tolist()) == (target if row < delta.n_rewrite else [])
        # the logits at each target position predict the next token of the row
        assert [ids[p + 1] for p in delta.target_positions[rows].tolist()] == delta.target_ids[rows].tolist()


def test_stacked_delta_prompts_keep_each_request_s_rows_padded_with_the_pad_id_and_masked(tokenizer):
    """Request after request, each block is the request's own batch, right-padded to the widest with the pad id given and
    attention mask 0; `starts` are the row counts of the blocks before it."""
    short = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")
    long = EditRequest(prompt="The mother tongue of {} is, as everyone knows,", subject="Danielle Darrieux",
                       target_new="French")
    cases = [encode_delta_prompts(tokenizer, request, ["{}", "The city. {}"]) for request in (short, long, short)]
    widths = [case.batch.input_ids.shape[1] for case in cases]
    assert widths[0] < widths[1]
    pad_id = 7  # not the tokenizer's own 0, which the case batches are padded with
    stacked = stack_delta_prompts(cases, pad_id)
    rows = [case.batch.input_ids.shape[0] for case in cases]
    assert stacked.starts == [0, rows[0], rows[0] + rows[1]]
    assert stacked.batch.input_ids.shape == (sum(rows), widths[1])
    for case, start, n_rows, width in zip(cases, stacked.starts, rows, widths):
        ids = stacked.batch.input_ids[start:start + n_rows]
        mask = stacked.batch.attention_mask[start:start + n_rows]
        assert torch.equal(ids[:, :width], case.batch.input_ids)
        assert torch.equal(mask[:, :width], case.batch.attention_mask)
        assert (ids[:, width:] == pad_id).all() and (mask[:, width:] == 0).all()


def test_delta_prompts_move_every_tensor_their_padded_batch_included(tokenizer):
    request = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")
    moved = encode_delta_prompts(tokenizer, request, ["{}", "The city. {}"]).to("meta")
    tensors = [moved.batch.input_ids, moved.batch.attention_mask, moved.subject_positions,
               moved.last_prompt_positions, moved.target_rows, moved.target_positions, moved.target_ids]
    assert all(t.device.type == "meta" for t in tensors)
    stacked = stack_delta_prompts([encode_delta_prompts(tokenizer, request, ["{}"])], pad_id_of(tokenizer)).to("meta")
    assert stacked.batch.input_ids.device.type == "meta" and stacked.cases[0].batch.input_ids.device.type == "meta"
