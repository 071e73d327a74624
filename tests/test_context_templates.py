"""Context templates: ROME's own sampling (the default) and this project's earlier fixed-length one
(`editor.context_template_style`).

ROME's style is checked on a scripted model whose next token is known at every step (so the draw is certain
with top-k 1), against transformers' greedy decoding on a tiny random model, and against ROME's loop over whole texts
on every family. Fluency's texts are sampled by the same function (tests/test_generation_metrics.py).
"""
from __future__ import annotations

import unicodedata
from types import SimpleNamespace

import pytest
import torch

import sadr.editors.context_templates as templates_module
from sadr.cache import JSON
from sadr.editors.context_templates import SEED_WORDS, context_templates
from sadr.editors.registry import EDITORS
from sadr.errors import InvalidSettingError
from sadr.models.fingerprint import cache_key
from sadr.models.generation import sample_texts, sample_to_length_like_rome
from tests.editing import composed_editor
from tests.tiny_models import FAMILIES, make_model, make_sentencepiece_tokenizer


class ScriptedModel(torch.nn.Module):
    """A causal LM stand-in whose next token after a prompt of `prompt_length` tokens is script[generated so far]; it
    counts the tokens before those it is fed in its key/value cache, as a model does."""

    config = None

    def __init__(self, script: list[int], prompt_length: int, vocab: int):
        super().__init__()
        self.script, self.prompt_length, self.vocab = script, prompt_length, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache, use_cache):
        placeholder = torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 1)
        cache.update(placeholder, placeholder, 0)
        step = cache.get_seq_length() - self.prompt_length
        assert 0 <= step < len(self.script), f"asked for token {step} of a script of {len(self.script)}"
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[step]] = 10.0
        return SimpleNamespace(logits=logits)


def test_rome_style_draws_eos_goes_on_after_it_and_cleans_the_text(tokenizer):
    prompt = tokenizer("Because")["input_ids"]
    script = [tokenizer.eos_token_id, *tokenizer("\n\nso")["input_ids"], *tokenizer(" \ufb01ne")["input_ids"]]
    model = ScriptedModel(script, len(prompt), len(tokenizer))
    total = len(prompt) + len(script)  # the length counts the prompt's tokens
    texts = sample_to_length_like_rome(model, tokenizer, ["Because", "Because"], total_tokens=total, seed=0, top_k=1)
    # EOS was drawn first and dropped from the text; sampling went on; "\n\n" became " "; NFKD split the ligature
    assert texts == ["Because so fine", "Because so fine"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_style_draws_what_a_loop_over_whole_texts_draws(family, tokenizer):
    """The sampler feeds one token a step with a KV cache; ROME's loop without a cache, written out here, makes the
    same draws from the same generator (top 5, two rows of one prompt, another prompt after them)."""
    model = make_model(family)
    prompts, total = ["The", "The", "Because of"], 16
    generator, expected = torch.Generator().manual_seed(4), []
    for prompt, rows in (("The", 2), ("Because of", 1)):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]] * rows)
        while ids.shape[1] < total:
            with torch.no_grad():
                probs = model(input_ids=ids).logits[:, -1].softmax(dim=-1)
            top = probs.topk(5, dim=-1)
            pick = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=generator)
            ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
        expected += tokenizer.batch_decode(ids, skip_special_tokens=True)
    got = sample_to_length_like_rome(model, tokenizer, prompts, total_tokens=total, seed=4)
    assert got == [unicodedata.normalize("NFKD", text).replace("\n\n", " ") for text in expected]
    assert got[0] != got[1]


def test_rome_style_with_top_1_is_greedy_decoding_to_the_total_length(tokenizer):
    """Against transformers' own greedy decoding (EOS forbidden, which a tiny random model never prefers here)."""
    model = make_model("llama")
    prompts = ["The", "Therefore", "You"]
    texts = sample_to_length_like_rome(model, tokenizer, prompts, total_tokens=7, seed=0, top_k=1)
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=7 - ids.shape[1], min_new_tokens=7 - ids.shape[1],
                             pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] == 7
        assert text == tokenizer.decode(out[0], skip_special_tokens=True).replace("\n\n", " ")


def test_styles_are_seeded_cached_apart_and_keep_the_fixed_cache_keys(tokenizer, tmp_path, monkeypatch):
    model = make_model("llama")
    params = [[5, 5], [10, 5]]
    kwargs = dict(seed=3, fingerprint="tiny", cache_dir=tmp_path)
    fixed = context_templates(model, tokenizer, params, style="fixed", **kwargs)
    reference = context_templates(model, tokenizer, params, style="reference", **kwargs)
    for made in (fixed, reference):
        assert len(made) == 11 and made[0] == "{}"
        assert all(t.endswith(". {}") and t.startswith(SEED_WORDS) for t in made[1:])
    assert fixed != reference
    files = {path.name.removesuffix(JSON.suffix) for path in (tmp_path / "context_templates").glob("*" + JSON.suffix)}
    fixed_key = cache_key(kind="context_templates", model="tiny", params=params, seed=3, words=SEED_WORDS, top_k=5,
                          device="cpu")
    assert len(files) == 2 and fixed_key in files  # templates cached before the styles existed are still found

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(templates_module, "sample_texts", no_sampling)
    monkeypatch.setattr(templates_module, "sample_to_length_like_rome", no_sampling)
    assert context_templates(model, tokenizer, params, style="fixed", **kwargs) == fixed
    assert context_templates(model, tokenizer, params, style="reference", **kwargs) == reference
    with pytest.raises(InvalidSettingError, match="context_template_style"):
        context_templates(model, tokenizer, params, style="rome", **kwargs)


def test_fixed_style_sampling_with_top_1_is_greedy_decoding_with_eos_forbidden(tokenizer):
    """Prompts of 1 to 3 tokens in one left-padded batch, on a model whose head always prefers EOS: each text is
    transformers' greedy decoding of its prompt alone with EOS forbidden, and the global RNG is left as it was."""
    model = make_model("llama")
    eos_first = torch.zeros(len(tokenizer))
    eos_first[tokenizer.eos_token_id] = 100.0
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + eos_first)
    prompts = ["The", "Therefore", "I", "You"]
    rng = torch.get_rng_state()
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens=4, seed=0, top_k=1)
    assert torch.equal(torch.get_rng_state(), rng)
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                             min_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.eos_token_id not in out[0, ids.shape[1]:]
        assert text == tokenizer.decode(out[0], skip_special_tokens=True) != prompt


def test_fixed_style_sampling_is_seeded(tokenizer):
    """The same seed draws the same texts, another seed others (top 5 of a random model: nearly uniform)."""
    model = make_model("llama")
    draw = lambda seed: sample_texts(model, tokenizer, ["The", "You"] * 3, max_new_tokens=6, seed=seed)  # noqa: E731
    assert draw(3) == draw(3) != draw(4)


def test_fixed_style_sampling_draws_its_batches_from_one_stream_that_the_seed_starts(tokenizer):
    """Batches of 2 (the last of 1) draw one after another from the stream torch.manual_seed(seed) starts, as one loop
    of transformers' sampling over the left-padded batches does: the batch-at-a-time sampling (`sampled_batches`) that
    lets a generated corpus resume draws each batch from the state the one before left, not from the seed's again."""
    model = make_model("llama")
    prompts = ["The", "You", "In", "A", "It"]
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens=5, seed=11, batch_size=2)
    expected = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        for start in range(0, len(prompts), 2):
            ids = [tokenizer(prompt)["input_ids"] for prompt in prompts[start : start + 2]]
            width = max(map(len, ids))
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in ids])
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, top_k=5, top_p=1.0,
                                 temperature=1.0, max_new_tokens=5, min_new_tokens=5,
                                 pad_token_id=tokenizer.pad_token_id)
            expected += tokenizer.batch_decode(out, skip_special_tokens=True)
    assert texts == expected and len(set(texts)) == len(prompts)


@pytest.mark.parametrize("style", ["fixed", "reference"])
def test_each_length_class_is_sampled_from_its_own_seed_to_its_length(style, tokenizer, tmp_path):
    """Class i of [[max_tokens, count], ...] is `count` texts from seed + i, each seed word count/5 times: the fixed
    style with max_tokens - 1 new tokens, the reference style to max_tokens tokens in all."""
    model = make_model("llama")
    made = context_templates(model, tokenizer, [[5, 5], [10, 10]], seed=3, fingerprint="tiny", cache_dir=tmp_path,
                             style=style)
    expected = ["{}"]
    for index, (max_tokens, count) in enumerate([[5, 5], [10, 10]]):
        prompts = [word for word in SEED_WORDS for _ in range(count // 5)]
        if style == "fixed":
            texts = sample_texts(model, tokenizer, prompts, max_new_tokens=max_tokens - 1, seed=3 + index)
        else:
            texts = sample_to_length_like_rome(model, tokenizer, prompts, total_tokens=max_tokens, seed=3 + index)
        expected += [text + ". {}" for text in texts]
    assert made == expected


def test_templates_are_cached_apart_per_model_seed_and_lengths(tokenizer, tmp_path):
    """Another model (fingerprint), seed or length setting never reads the templates cached for the first."""
    kwargs = dict(cache_dir=tmp_path, style="reference")
    first = context_templates(make_model("llama"), tokenizer, [[5, 5]], seed=3, fingerprint="tiny", **kwargs)
    other_model = make_model("llama", seed=1)
    others = [context_templates(other_model, tokenizer, [[5, 5]], seed=3, fingerprint="tiny-1", **kwargs),
              context_templates(make_model("llama"), tokenizer, [[5, 5]], seed=4, fingerprint="tiny", **kwargs),
              context_templates(make_model("llama"), tokenizer, [[6, 5]], seed=3, fingerprint="tiny", **kwargs)]
    assert all(other != first for other in others)
    assert len(list((tmp_path / "context_templates").glob("*.json"))) == 4


def test_braces_in_a_sampled_text_leave_one_slot_for_the_subject(tokenizer, tmp_path, monkeypatch):
    """A sampled "{" or "}" would make `template.format(subject)` fail or fill the wrong place."""
    monkeypatch.setattr(templates_module, "sample_to_length_like_rome",
                        lambda model, tokenizer, prompts, **kwargs: [f"{p} {{x}} and {{}}" for p in prompts])
    made = context_templates(make_model("llama"), tokenizer, [[5, 5]], seed=0, fingerprint="tiny",
                             cache_dir=tmp_path, style="reference")
    assert made[1:] == [f"{word}  x  and   . {{}}" for word in SEED_WORDS]
    assert made[1].format("Paris") == "The  x  and   . Paris"


@pytest.mark.parametrize("editor, expected", [("rome", [[5, 10], [10, 10]]), ("memit", [[10, 5]]), ("pmet", [[10, 5]])])
def test_each_editor_s_templates_are_two_per_seed_word_of_method_md(editor, expected, tokenizer, tmp_path, monkeypatch):
    """method.md §2: ROME 10 prefixes of <= 5 and 10 of <= 10 tokens, MEMIT/PMET 5 of <= 10, drawn evenly from the
    seed words The, Therefore, Because, I, You; the sampler is replaced by one that echoes its seed word and length."""
    def echo(model, tokenizer, prompts, total_tokens, **kwargs):
        return [f"{prompt} {total_tokens}" for prompt in prompts]

    monkeypatch.setattr(templates_module, "sample_to_length_like_rome", echo)
    cfg = composed_editor(editor, "gpt-j")
    assert cfg.context_templates == expected
    made = context_templates(make_model("llama"), tokenizer, cfg.context_templates, seed=0, fingerprint="tiny",
                             cache_dir=tmp_path, style="reference")
    words = ["The", "Therefore", "Because", "I", "You"]
    by_hand = ["{}"] + [f"{word} {length}. {{}}" for length, count in expected for word in words
                        for _ in range(count // 5)]
    assert made == by_hand


def test_a_count_that_is_not_a_multiple_of_the_seed_words_is_refused(tokenizer, tmp_path):
    """7 templates cannot be sampled evenly from 5 seed words (7 // 5 would silently give 5)."""
    with pytest.raises(InvalidSettingError, match=r"count 7 must be a multiple of 5"):
        context_templates(make_model("llama"), tokenizer, [[5, 7]], seed=0, fingerprint="tiny", cache_dir=tmp_path,
                          style="fixed")


@pytest.mark.parametrize("editor", sorted(EDITORS))
def test_every_editor_samples_its_templates_as_the_reference_code_by_default(editor):
    assert composed_editor(editor, "smollm2-135m").context_template_style.name == "reference"


def test_templates_cached_by_sadr_before_crc32_entries_are_left_alone(tokenizer, tmp_path):
    """sadr before 2026-12-06 wrote bare JSON under <key>.json; sharing a cache, each version reads only its own."""
    model = make_model("llama")
    key = cache_key(kind="context_templates", model="tiny", params=[[5, 5]], seed=3, words=SEED_WORDS, top_k=5,
                    device="cpu")
    old = tmp_path / "context_templates" / f"{key}.json"
    old.parent.mkdir(parents=True)
    old.write_text('["{}", "Written by an older sadr. {}"]')
    made = context_templates(model, tokenizer, [[5, 5]], seed=3, fingerprint="tiny", cache_dir=tmp_path, style="fixed")
    assert "Written by an older sadr. {}" not in made and len(made) == 6
    assert old.read_text() == '["{}", "Written by an older sadr. {}"]'  # neither read nor removed
    assert (old.parent / f"{key}{JSON.suffix}").is_file()


def _with_bos(tokenizer):
    """The tiny tokenizer, adding a BOS token (its EOS token, as GPT-2's tokenizer names both) before every text, as
    Llama's does."""
    from tokenizers.processors import TemplateProcessing

    from tests.tiny_models import make_tokenizer

    made = make_tokenizer()
    eos = made.eos_token
    made.backend_tokenizer.post_processor = TemplateProcessing(single=f"{eos} $A", special_tokens=[(eos, made.eos_token_id)])
    made.bos_token = eos
    assert made("The")["input_ids"] == [made.eos_token_id] + tokenizer("The")["input_ids"]
    return made


def test_rome_style_lengths_count_a_bos_token_and_the_seed_word(tokenizer):
    """ROME's `generate_fast` grows `tok(prompt)` (BOS included) while it has fewer than max_out_len tokens: with top-k 1,
    each text is the greedy loop from [BOS] + the seed word's tokens to `total` tokens in all, written out here."""
    bos_tokenizer = _with_bos(tokenizer)
    model = make_model("llama")
    total = 6
    texts = sample_to_length_like_rome(model, bos_tokenizer, ["The", "You"], total_tokens=total, seed=0, top_k=1)
    for prompt, text in zip(["The", "You"], texts):
        ids = torch.tensor([[bos_tokenizer.eos_token_id] + tokenizer(prompt)["input_ids"]])
        while ids.shape[1] < total:
            with torch.no_grad():
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert text == bos_tokenizer.decode(ids[0], skip_special_tokens=True).replace("\n\n", " ")


def test_rome_style_grows_a_prompt_one_token_short_of_the_length(tokenizer):
    """`while len < total`: a prompt of total - 1 tokens takes one more; one of total tokens is returned as it is."""
    prompt = tokenizer("Because")["input_ids"]
    script = tokenizer(" so")["input_ids"][:1]
    model = ScriptedModel(script, len(prompt), len(tokenizer))
    grown = tokenizer.decode(prompt + script)
    assert grown != "Because"
    assert sample_to_length_like_rome(model, tokenizer, ["Because"], total_tokens=len(prompt) + 1, seed=0,
                                      top_k=1) == [grown]
    assert sample_to_length_like_rome(model, tokenizer, ["Because"], total_tokens=len(prompt), seed=0,
                                      top_k=1) == ["Because"]


@pytest.mark.parametrize("style", ["reference", "fixed"])
def test_sentencepiece_context_templates_start_with_their_seed_word_and_read_back_as_they_were_sampled(style, tmp_path):
    """With a tokenizer like Llama-2's (its decoder drops the "▁" of the first word, BOS and pad are skipped): each
    template starts with its seed word, without a space or "<s>", and its text encodes to the tokens it decodes from;
    the prompt after the template starts with its own "▁" word."""
    tokenizer = make_sentencepiece_tokenizer()
    model = make_model("llama", tokenizer=tokenizer)
    made = context_templates(model, tokenizer, [[5, 5], [10, 5]], seed=0, fingerprint="sentencepiece",
                             cache_dir=tmp_path, style=style)
    assert made[0] == "{}" and len(made) == 11
    for template, seed_word in zip(made[1:], [w for _ in range(2) for w in SEED_WORDS]):
        assert template.startswith(seed_word) and template.endswith(". {}") and "<s>" not in template
        text = template[: -len(" {}")]
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        filled = tokenizer.convert_ids_to_tokens(tokenizer(template.format("Paris is"))["input_ids"])
        assert filled[-4:] == ["▁Pa", "ri", "s", "▁is"]
