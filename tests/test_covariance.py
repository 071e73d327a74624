import logging

import numpy as np
import pytest
import torch

from sadr.cache import TORCH, read_entry
from sadr.data.corpus import Corpus
from sadr.editors import covariance
from sadr.editors.covariance import SecondMomentStatistics, accumulate_second_moments, load_rome_npz
from sadr.errors import InvalidSettingError, MissingInputError
from sadr.models.adapters import adapter_for
from tests.editing import random_texts
from tests.tiny_models import make_model

TEXTS = ["The capital of France is Paris.", "Toyota is a company based in Japan, and Honda too.",
         "I said you should know", "Because London is in England"]


def _direct(model, tokenizer, layer, sample_length: int | None = None):
    """Reference: one text at a time (its first `sample_length` tokens), no padding, keys from the module's input,
    mean of k kᵀ."""
    adapter = adapter_for(model)
    keys = []
    handle = adapter.mlp_down_module(model, layer).register_forward_pre_hook(lambda m, a: keys.append(a[0][0].double()))
    with torch.no_grad():
        for text in TEXTS:
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"][:sample_length]]))
    handle.remove()
    k = torch.cat(keys)
    return k.T @ k / k.shape[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(("batch_tokens", "chunk_bytes"), [(24, 2**28), (4096, 8 * 256 * 3), (24, 8 * 256)])
def test_covariance_matches_direct_computation(family, batch_tokens, chunk_bytes, tokenizer, monkeypatch):
    """Whatever the batching (24 tokens: several padded batches) and the float64 chunking (3 or 1 token(s) of the
    256-wide keys at a time), the streamed sums equal the direct computation."""
    monkeypatch.setattr(covariance, "CHUNK_BYTES", chunk_bytes)
    model = make_model(family)
    adapter = adapter_for(model)
    result = accumulate_second_moments(model, adapter, tokenizer, [1, 2], TEXTS, sample_length=64, batch_tokens=batch_tokens)
    assert result.count == sum(len(tokenizer(text)["input_ids"]) for text in TEXTS)
    for layer in (1, 2):
        moment = result.take_moment(layer)
        assert moment.dtype == torch.float64 and torch.equal(moment, moment.T)
        torch.testing.assert_close(moment, _direct(model, tokenizer, layer), rtol=1e-5, atol=1e-7)
    assert set(result.seconds) == {"forward", "accumulate", "corpus"}


def test_each_text_is_cut_at_sample_length_tokens(tokenizer):
    """Texts longer than `sample_length` count only their first tokens, as the reference code's cut."""
    model = make_model("gpt2")
    lengths = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    assert max(lengths) > 8 and min(lengths) <= 8
    result = accumulate_second_moments(model, adapter_for(model), tokenizer, [1], TEXTS, sample_length=8, batch_tokens=24)
    assert result.count == sum(min(n, 8) for n in lengths)
    torch.testing.assert_close(result.take_moment(1), _direct(model, tokenizer, 1, sample_length=8), rtol=1e-5, atol=1e-7)


class _CountingTokenizer:
    """The tokenizer, counting the texts it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.encoded += 1
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_killed_statistics_pass_resumes_from_its_checkpoint_with_the_same_sums(tokenizer, tmp_path):
    """Saved between batches, the sums let a rerun skip the texts they hold: the result equals an uninterrupted pass
    bit for bit, and only the texts after the checkpoint are encoded and run again."""
    model = make_model("llama")
    adapter = adapter_for(model)
    texts = TEXTS * 3  # 12 texts, about 3 per 24-token batch

    def run(corpus, checkpoint=None, counting=None):
        return accumulate_second_moments(model, adapter, counting or tokenizer, [1, 2], corpus, sample_length=64,
                                         batch_tokens=24, checkpoint=checkpoint)

    whole = run(texts)
    checkpoint = covariance.PassCheckpoint(tmp_path / "pass.partial.pt", {"layers": [1, 2]}, every_seconds=0.0)

    def killed_after(n):
        yield from texts[:n]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(killed_after(9), checkpoint)
    done = torch.load(checkpoint.path)["texts"]
    assert 0 < done <= 9
    counting = _CountingTokenizer(tokenizer)
    resumed = run(texts, checkpoint, counting)
    assert counting.encoded == len(texts) - done
    assert resumed.count == whole.count
    for layer in (1, 2):
        assert torch.equal(resumed.take_moment(layer), whole.take_moment(layer))
    other = covariance.PassCheckpoint(checkpoint.path, {"layers": [1]}, every_seconds=0.0)  # another pass's
    assert other.load() is None
    # resumed with other batching (after running out of memory, say): the same sums up to the float32 rounding of keys
    # computed in other batch shapes, as `test_covariance_matches_direct_computation` allows
    checkpoint.remove()
    with pytest.raises(KeyboardInterrupt):
        run(killed_after(9), checkpoint)
    rebatched = accumulate_second_moments(model, adapter, tokenizer, [1, 2], texts, sample_length=64, batch_tokens=64,
                                          checkpoint=checkpoint)
    assert rebatched.count == whole.count
    whole = run(texts)
    for layer in (1, 2):
        torch.testing.assert_close(rebatched.take_moment(layer), whole.take_moment(layer), rtol=1e-5, atol=1e-7)


def test_ctrl_c_in_a_batch_keeps_the_sums_with_that_batch_and_the_rerun_gives_the_same_sums(tokenizer, tmp_path):
    """A real SIGINT while the second batch's forward runs, and no checkpoint due for an hour: the batch finishes in
    every layer, the sums are saved after it, and the resumed pass equals an uninterrupted one bit for bit."""
    import os
    import signal

    model = make_model("llama")
    adapter = adapter_for(model)
    texts = TEXTS * 3
    whole = accumulate_second_moments(model, adapter, tokenizer, [1, 2], texts, sample_length=64, batch_tokens=24)
    checkpoint = covariance.PassCheckpoint(tmp_path / "pass.partial.pt", {"layers": [1, 2]}, every_seconds=3600.0)
    rows = []

    def interrupt_the_second_batch(_module, args):
        rows.append(args[0].shape[0])
        if len(rows) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    handle = adapter.mlp_down_module(model, 1).register_forward_pre_hook(interrupt_the_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            accumulate_second_moments(model, adapter, tokenizer, [1, 2], texts, sample_length=64, batch_tokens=24,
                                      checkpoint=checkpoint)
    finally:
        handle.remove()
    assert torch.load(checkpoint.path)["texts"] == sum(rows) < len(texts)  # the first two batches' texts
    resumed = accumulate_second_moments(model, adapter, tokenizer, [1, 2], texts, sample_length=64, batch_tokens=24,
                                        checkpoint=checkpoint)
    assert resumed.count == whole.count
    for layer in (1, 2):
        assert torch.equal(resumed.take_moment(layer), whole.take_moment(layer))


def test_a_second_ctrl_c_while_a_stopped_pass_saves_its_sums_does_not_cut_the_save_short(tokenizer, tmp_path,
                                                                                          monkeypatch):
    """`timeout -s INT` signals the process and then its group, and a user may press Ctrl-C again while the sums (GBs
    at a published model's width) are written: the sums are saved all the same, and the first interrupt ends the
    pass."""
    import os
    import signal

    model = make_model("llama")
    texts = TEXTS * 3
    checkpoint = covariance.PassCheckpoint(tmp_path / "pass.partial.pt", {"layers": [1]}, every_seconds=3600.0)
    write = covariance.write_atomically

    def interrupted_again(*args):
        os.kill(os.getpid(), signal.SIGINT)
        write(*args)

    def killed_after(n):
        yield from texts[:n]
        raise KeyboardInterrupt("the first")

    monkeypatch.setattr(covariance, "write_atomically", interrupted_again)
    with pytest.raises(KeyboardInterrupt, match="the first"):
        accumulate_second_moments(model, adapter_for(model), tokenizer, [1], killed_after(9), sample_length=64,
                                  batch_tokens=24, checkpoint=checkpoint)
    assert 0 < torch.load(checkpoint.path)["texts"] <= 9


def test_a_resumed_pass_counts_the_texts_of_its_checkpoint_as_done_but_not_in_its_rate(tokenizer, tmp_path,
                                                                                         monkeypatch, caplog):
    """Each text this process encodes takes 2 s on a hand-set clock; the skipped ones take none, as they nearly do."""
    import logging

    from sadr import progress as progress_module

    model = make_model("llama")
    texts = TEXTS * 3
    checkpoint = covariance.PassCheckpoint(tmp_path / "pass.partial.pt", {"layers": [1]}, every_seconds=0.0)

    def killed_after(n):
        yield from texts[:n]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        accumulate_second_moments(model, adapter_for(model), tokenizer, [1], killed_after(9), sample_length=64,
                                  batch_tokens=24, checkpoint=checkpoint)
    done = torch.load(checkpoint.path)["texts"]
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(covariance, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="sadr.progress")

    class SlowTokenizer(_CountingTokenizer):
        def __call__(self, text, **kwargs):
            clock[0] += 2.0
            return super().__call__(text, **kwargs)

    accumulate_second_moments(model, adapter_for(model), SlowTokenizer(tokenizer), [1], texts, sample_length=64,
                              batch_tokens=24, expected_texts=len(texts), checkpoint=checkpoint)
    assert done == 8  # the checkpoint before the batch that the 9th text opened
    # the rate of this process's 2 s a text, read as a fresh pass reads it (a text counts when it is taken, before it
    # is encoded); the 8 skipped texts counted in the rate would make it about 0.2 s a text
    assert [r.getMessage() for r in caplog.records] == [
        "key statistics:  75% 9/12 [00:00<?, ?text/s]", "key statistics:  83% 10/12 [00:02<00:02,  1.00text/s]",
        "key statistics:  92% 11/12 [00:04<00:01,  1.33s/text]",
        "key statistics: 100% 12/12 [00:06<00:00,  1.50s/text]"]


def test_a_finished_pass_leaves_no_checkpoint(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(covariance, "CHECKPOINT_SECONDS", 0.0)
    model = make_model("llama")
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f",
                                   corpus=Corpus({"kind": "test"}, lambda: iter(random_texts())), sample_length=64,
                                   batch_tokens=256, cache_dir=tmp_path)
    saved = []
    save = covariance.PassCheckpoint.save
    monkeypatch.setattr(covariance.PassCheckpoint, "save", lambda self, *args: (saved.append(self.path), save(self, *args)))
    stats.take([1])
    assert saved and not saved[0].exists() and saved[0].name.endswith(".partial.pt")


@pytest.mark.parametrize(("width", "blocks"), [(256, 8), (37, 8), (5, 8), (12, 1)])
def test_an_upper_triangular_sum_is_the_full_product_and_stores_about_half_of_it(width, blocks):
    """Added in three chunks, the sum equals kᵀk computed at once (float64, independent), is exactly symmetric, and
    its blocks hold (d² + d · block)/2 numbers at most."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(50, width, generator=g, dtype=torch.float64)
    total = covariance.UpperTriangularSum(width, torch.device("cpu"), blocks)
    stored = sum(rows.numel() for rows in total.rows)
    step = -(-width // blocks)
    assert stored <= (width * width + width * step) / 2
    for chunk in keys.split(20):
        total.add(chunk)
    full = total.take_full()
    assert torch.equal(full, full.T) and not total.rows
    torch.testing.assert_close(full, keys.T @ keys, rtol=1e-12, atol=1e-12)


def test_float32_products_stay_within_float32_rounding_of_the_float64_statistics(tokenizer, tmp_path):
    """`model.stats.product_dtype=float32`: each chunk's products in float32, the sums in float64. C agrees with the
    float64 pass to float32 rounding, differs from it (the products really were float32), and is cached apart."""
    model = make_model("llama")
    adapter = adapter_for(model)
    moments = {}
    for dtype in (torch.float64, torch.float32):
        result = accumulate_second_moments(model, adapter, tokenizer, [1], TEXTS, sample_length=64, batch_tokens=4096,
                                           product_dtype=dtype)
        moments[dtype] = result.take_moment(1)
    assert moments[torch.float32].dtype == torch.float64
    torch.testing.assert_close(moments[torch.float32], moments[torch.float64], rtol=1e-5, atol=1e-6)
    assert not torch.equal(moments[torch.float32], moments[torch.float64])

    def description(dtype):
        return SecondMomentStatistics(model, adapter, tokenizer, fingerprint="f", corpus=Corpus({"kind": "test"}, list),
                                      sample_length=64, batch_tokens=256, cache_dir=tmp_path,
                                      product_dtype=dtype).description()

    assert description(torch.float64) == {"kind": "test", "sample_length": 64}  # existing caches keep their keys
    assert description(torch.float32) == {"kind": "test", "sample_length": 64, "products": "float32"}


def test_statistics_pass_stops_before_the_highest_requested_layer_s_down_projection(tokenizer):
    """The keys are the down-projection's input: the highest layer's own product is never computed."""
    model = make_model("llama")
    adapter = adapter_for(model)
    ran = []
    handles = [module.register_forward_hook(lambda *_, name=(kind, layer): ran.append(name))
               for layer in range(4)
               for kind, module in (("block", adapter.block(model, layer)), ("down", adapter.mlp_down_module(model, layer)))]
    head = model.lm_head.register_forward_hook(lambda *_: ran.append("head"))
    accumulate_second_moments(model, adapter, tokenizer, [1, 0], TEXTS[:1], sample_length=64, batch_tokens=4096)
    for handle in (*handles, head):
        handle.remove()
    assert ran == [("down", 0), ("block", 0)]  # block 1 stops before its down-projection; blocks 2, 3, the head never run


def test_statistics_are_cached_on_disk_and_keyed_by_corpus(tmp_path, tokenizer):
    model = make_model("llama")
    adapter = adapter_for(model)
    calls = []

    def corpus(texts, tag):
        return Corpus({"kind": "test", "tag": tag}, lambda: (calls.append(tag), iter(texts))[1])

    def stats(c):
        return SecondMomentStatistics(model, adapter, tokenizer, fingerprint="f", corpus=c, sample_length=64,
                                      batch_tokens=256, cache_dir=tmp_path)

    texts = random_texts()
    first = stats(corpus(texts, "a")).take([1, 2])
    again = stats(corpus(texts, "a")).take([1, 2])
    other = stats(corpus(texts[:48], "b")).take([1])
    assert calls == ["a", "b"]  # one pass for both layers; the second service read the cache
    torch.testing.assert_close(first[1], again[1])
    assert not torch.allclose(first[1], other[1])


def test_the_pass_reads_its_memory_peak_after_every_c_left_the_device(tmp_path, tokenizer, monkeypatch):
    """Making C whole from its upper triangle is part of the pass: the peak is read (and reset) after it, so the
    first edits' peak does not hold the pass's leftovers."""
    model = make_model("llama")
    events = []
    take_moment = covariance.SecondMomentSums.take_moment
    monkeypatch.setattr(covariance.SecondMomentSums, "take_moment",
                        lambda sums, layer: (events.append(f"C{layer}"), take_moment(sums, layer))[1])
    monkeypatch.setattr(covariance, "take_peak_memory", lambda device: (events.append("peak"), {})[1])
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f",
                                   corpus=Corpus({"kind": "test"}, lambda: iter(random_texts())), sample_length=64,
                                   batch_tokens=256, cache_dir=tmp_path)
    stats.take([1, 2])
    assert events == ["C1", "C2", "peak"]


def test_a_corpus_with_fewer_tokens_than_key_dimensions_is_a_clear_error(tmp_path, tokenizer):
    """C would be singular: the error says so and names the settings that add text; nothing is cached."""
    model = make_model("llama")
    corpus = Corpus({"kind": "test", "n": 2}, lambda: iter(TEXTS[:2]))
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=corpus,
                                   sample_length=64, batch_tokens=256, cache_dir=tmp_path)
    with pytest.raises(InvalidSettingError, match=r"gave \d+ tokens, fewer than the \d+ dimensions.*model.stats.n_samples \(now 2\)"):
        stats.take([1])
    assert not list((tmp_path / "stats").glob("*.pt"))


def test_a_statistics_pass_out_of_gpu_memory_names_the_setting_that_bounds_it(tmp_path, tokenizer, monkeypatch):
    from sadr.errors import DeviceMemoryError

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(covariance, "accumulate_second_moments", out_of_memory)
    model = make_model("llama")
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f",
                                   corpus=Corpus({"kind": "test"}, lambda: iter(TEXTS)), sample_length=64,
                                   batch_tokens=256, cache_dir=tmp_path)
    with pytest.raises(DeviceMemoryError, match=r"layers \[1\] ran out of GPU memory \(CUDA out of memory. Tried to "
                                                r"allocate 2.00 GiB\); lower model.stats.batch_tokens \(now 256\)"):
        stats.factorized([1])
    assert not list(tmp_path.rglob("*.pt"))


def test_rome_npz_statistics_are_loaded_as_mean(tmp_path):
    total = np.array([[4.0, 2.0], [2.0, 6.0]], dtype=np.float32)
    path = tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_100.npz"
    np.savez(path, **{"mom2.mom2": total, "mom2.count": np.array(2)})
    torch.testing.assert_close(load_rome_npz(path), torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
    with pytest.raises(FileNotFoundError, match="model.stats.npz_dir"):
        load_rome_npz(tmp_path / "missing.npz")
    # ROME's files of another sample count: the error names them and the key that picks the count
    with pytest.raises(FileNotFoundError, match=r"c_proj_float32_mom2_1000\.npz does not exist; .*<n> being "
                                                r"model\.stats\.n_samples; the folder holds "
                                                r"transformer\.h\.1\.mlp\.c_proj_float32_mom2_100\.npz: set "
                                                r"model\.stats\.n_samples to its <n>"):
        load_rome_npz(tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_1000.npz")
    np.savez(path, **{"mom2.mom2": total})  # a file of another kind
    with pytest.raises(InvalidSettingError, match=r"c_proj_float32_mom2_100\.npz lacks key\(s\) \['mom2\.count'\]; "
                                                  r"found \['mom2\.mom2'\]$"):
        load_rome_npz(path)


def test_hub_corpus_streams_through_datasets_from_a_local_folder(tmp_path):
    """The `hub` corpus goes through `datasets.load_dataset`; a local folder takes the same path offline, so both ends
    of the tested `datasets` range are exercised. `first` streams the first documents; empty texts are skipped (they
    hold no tokens)."""
    import json

    from sadr.data.corpus import hub_corpus

    rows = [{"text": "first document"}, {"text": "  "}, {"text": "second document"}, {"text": "third"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    corpus = hub_corpus(str(tmp_path), None, "train", n_samples=3, sample="first")
    assert list(corpus.texts()) == ["first document", "second document"]
    assert corpus.description == {"kind": "hub", "dataset": str(tmp_path), "config": None, "split": "train", "n": 3,
                                  "sample": "first"}


def test_hub_corpus_draws_the_documents_rome_code_draws(tmp_path):
    """ROME's `tally(..., random_sample=1)` shuffles the indices 0..n-1 with `random.Random(1)` and takes the first
    `sample_size`. For 10 documents and seed 1 that permutation starts 6, 8, 9, 7, 5, 3 (written out here from
    Python 3's random.Random(1).shuffle once, outside the code under test)."""
    import json

    from sadr.data.corpus import hub_corpus, reference_sample

    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(10)))
    assert reference_sample(10, 6, seed=1) == [6, 8, 9, 7, 5, 3]
    corpus = hub_corpus(str(tmp_path), None, "train", n_samples=4, sample="random", seed=1)
    assert list(corpus.texts()) == ["document 6", "document 8", "document 9", "document 7"]
    assert corpus.description["sample"] == "random" and corpus.description["seed"] == 1
    other = hub_corpus(str(tmp_path), None, "train", n_samples=4, sample="random", seed=2)
    assert list(other.texts()) != list(corpus.texts()) and other.description != corpus.description


def test_factorized_statistics_solve_with_C_and_release_it(tmp_path, tokenizer):
    model = make_model("llama")
    corpus = Corpus({"kind": "test"}, lambda: iter(random_texts()))
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=corpus,
                                   sample_length=64, batch_tokens=256, cache_dir=tmp_path)
    moment = stats.take([1])[1]
    factors = stats.factorized([1])[1]  # C read again from the disk cache, and factored in place
    assert 1 not in stats._memory  # one d × d matrix per layer stays: the factors
    rhs = torch.randn(moment.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(moment @ factors.solve(rhs), rhs)
    torch.testing.assert_close(factors.solve(rhs[:, 0]), factors.solve(rhs)[:, 0])
    assert stats.factorized([1])[1] is factors
    torch.testing.assert_close(stats.take([1])[1], moment)  # read again from the disk cache


def test_each_layer_s_c_is_factored_in_its_own_storage(tmp_path, tokenizer, monkeypatch):
    """Through `factorized`, C is loaded (here: computed) and factored in place."""
    from sadr.editors.update import FactorizedMoment

    model = make_model("llama")
    corpus = Corpus({"kind": "test"}, lambda: iter(random_texts()))
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=corpus,
                                   sample_length=64, batch_tokens=256, cache_dir=tmp_path)
    calls = []
    factor = FactorizedMoment.of
    monkeypatch.setattr(FactorizedMoment, "of", lambda moment, overwrite=False, **kwargs: calls.append(
        (moment.data_ptr(), overwrite)) or factor(moment, overwrite, **kwargs))
    factors = stats.factorized([1, 2])
    assert [overwrite for _, overwrite in calls] == [True, True]
    assert [f.lu.data_ptr() for f in factors.values()] == [pointer for pointer, _ in calls]
    assert all(f.lu.mT.is_contiguous() for f in factors.values())  # column-major: a solve copies nothing


def test_a_statistics_pass_logs_its_progress_over_the_corpus(tokenizer, monkeypatch, caplog):
    """The published pass reads 100,000 texts: its log says how far it is, at most a line per PROGRESS_SECONDS."""
    import logging

    model = make_model("llama")
    caplog.set_level(logging.INFO, logger="sadr.progress")
    monkeypatch.setattr(covariance, "PROGRESS_SECONDS", 3600.0)
    accumulate_second_moments(model, adapter_for(model), tokenizer, [1], TEXTS, sample_length=64, batch_tokens=24,
                              expected_texts=len(TEXTS))
    assert [r.getMessage().split(" [")[0] for r in caplog.records] == ["key statistics: 100% 4/4"]  # the last text
    caplog.clear()
    monkeypatch.setattr(covariance, "PROGRESS_SECONDS", 0.0)
    accumulate_second_moments(model, adapter_for(model), tokenizer, [1], TEXTS, sample_length=64, batch_tokens=24,
                              expected_texts=10)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" [")[0] for line in lines] == [f"key statistics:  {10 * i}% {i}/10" for i in (1, 2, 3, 4)]
    assert all("text/s" in line for line in lines)


def test_a_statistics_pass_counts_its_rate_from_the_corpus_s_first_text(tokenizer, monkeypatch, caplog):
    """A generated corpus samples all its texts before the first comes (a hub corpus downloads first): 1,000 s of
    that wait counted as the first text's would give `1/4 [16:40<50:00]`, an ETA of the wait × the texts left."""
    import logging

    from sadr import progress as progress_module

    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(covariance, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="sadr.progress")

    def slow_to_start():
        clock[0] += 1000.0
        for text in TEXTS:
            yield text
            clock[0] += 2.0

    model = make_model("llama")
    accumulate_second_moments(model, adapter_for(model), tokenizer, [1], slow_to_start(), sample_length=64,
                              batch_tokens=24, expected_texts=len(TEXTS))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(", ")[0] for line in lines] == [
        "key statistics:  25% 1/4 [00:00<?", "key statistics:  50% 2/4 [00:02<00:02",
        "key statistics:  75% 3/4 [00:04<00:01", "key statistics: 100% 4/4 [00:06<00:00"]


@pytest.mark.parametrize("factor_dtype", [torch.float64, torch.float32])
def test_a_singular_c_stops_the_run_with_an_error_naming_the_layer_and_its_file(tmp_path, tokenizer, factor_dtype):
    """A key coordinate that is zero in every token (a dead unit) leaves a zero row and column in C: factoring it fails,
    and the error says what to change instead of a LinAlgError traceback."""
    from sadr.errors import InvalidSettingError

    model = make_model("llama")
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f",
                                   corpus=Corpus({"kind": "test"}, lambda: iter(random_texts())), sample_length=64,
                                   batch_tokens=256, cache_dir=tmp_path, factor_dtype=factor_dtype)
    moment = stats.take([1])[1]
    moment[3, :] = moment[:, 3] = 0.0
    stats._memory[1] = moment
    with pytest.raises(InvalidSettingError, match=r"^the key statistics C of layer 1 are singular \(.*\), so no update "
                                                  r"can be solved with them: .* \(editor\.layers\)\. This layer's C is "
                                                  r"in .*stats/model\.layers\.1\.mlp\.down_proj\.[0-9a-f]+\.pt$"):
        stats.factorized([1])


def test_factors_kept_on_the_host_are_made_on_the_model_device_and_moved_one_layer_at_a_time(tmp_path, tokenizer,
                                                                                              monkeypatch):
    """With factors_on_host (model.stats.factor_device=cpu) each layer is factored where the model is, as without it,
    and its factors are moved to the host before the next layer's C is factored; they are the same factors."""
    from sadr.editors.update import FactorizedMoment

    model = make_model("llama")
    corpus = Corpus({"kind": "test"}, lambda: iter(random_texts()))

    def stats(on_host):
        return SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=corpus,
                                      sample_length=64, batch_tokens=256, cache_dir=tmp_path, factors_on_host=on_host)

    on_device = stats(False).factorized([1, 2])
    events = []
    factor, move = FactorizedMoment.of, FactorizedMoment.to
    monkeypatch.setattr(FactorizedMoment, "of", lambda moment, overwrite=False, **kwargs: events.append(
        ("factor", moment.device.type)) or factor(moment, overwrite, **kwargs))
    monkeypatch.setattr(FactorizedMoment, "to", lambda self, device: events.append(("move", device.type)) or move(self, device))
    on_host = stats(True).factorized([1, 2])
    assert events == [("factor", "cpu"), ("move", "cpu")] * 2
    for layer in (1, 2):
        assert on_host[layer].lu.device.type == "cpu" and on_host[layer].lu.mT.is_contiguous()
        assert torch.equal(on_host[layer].lu, on_device[layer].lu)
        assert torch.equal(on_host[layer].pivots, on_device[layer].pivots)


def test_float32_factors_are_made_from_a_converted_c_one_layer_at_a_time(tmp_path, tokenizer, monkeypatch):
    """C is converted before it goes to the device and factored layer by layer: the factorisation never sees a float64
    C, and a layer is factored before the next one leaves memory for the device."""
    from sadr.editors.update import FactorizedMoment, mirror_upper_triangle_

    model = make_model("llama")
    corpus = Corpus({"kind": "test"}, lambda: iter(random_texts()))

    def stats(factor_dtype):
        return SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=corpus,
                                      sample_length=64, batch_tokens=256, cache_dir=tmp_path, factor_dtype=factor_dtype)

    moments = {layer: c.clone() for layer, c in stats(torch.float64).take([1, 2]).items()}
    single = stats(torch.float32)
    seen = []
    factor = FactorizedMoment.of
    monkeypatch.setattr(FactorizedMoment, "of", lambda moment, overwrite=False, **kwargs: seen.append(
        (moment.dtype, sorted(single._memory))) or factor(moment, overwrite, **kwargs))
    factors = single.factorized([1, 2])
    assert seen == [(torch.float32, [2]), (torch.float32, [])]
    for layer, moment in moments.items():
        expected, _ = torch.linalg.lu_factor(mirror_upper_triangle_(moment.float()))
        assert factors[layer].lu.dtype == torch.float32 and torch.equal(factors[layer].lu, expected)


# Context lengths as published in each model's config (n_positions or max_position_embeddings).
CONTEXT = {"gpt2-xl": 1024, "gpt-j": 2048, "gpt-neox-20b": 2048, "tinyllama": 2048, "llama2-7b": 4096,
           "llama2-13b": 4096, "llama3-8b": 8192}


@pytest.mark.parametrize("model", sorted(CONTEXT))
def test_published_models_sample_their_statistics_as_the_reference_code(model):
    """100k Wikipedia articles drawn with seed 1, each cut at the model's context but at most 3072 tokens: the SADR
    repo's `layer_stats` caps the cut at its batch budget of 3 × 1024 tokens, which only Llama-2/3 exceed."""
    from tests.runs import composed

    stats = composed([f"model={model}"]).model.stats
    assert (stats.corpus.name, stats.hub_dataset, stats.hub_sample.name, stats.sample_seed, stats.n_samples) == (
        "hub", "wikimedia/wikipedia", "random", 1, 100000)
    assert stats.sample_length == min(CONTEXT[model], 3072)


def test_a_generated_corpus_samples_about_batch_tokens_tokens_at_a_time(tokenizer, caplog):
    """The sampling's key-value cache is bounded like the pass's forwards; the batch, which changes the texts drawn,
    is in the description (and so in the statistics' cache keys). The sampling says what it does before the wait."""
    from sadr.data.corpus import generated_corpus

    model = make_model("llama").eval()
    rows = []
    generate = model.generate
    model.generate = lambda **kwargs: rows.append(kwargs["input_ids"].shape[0]) or generate(**kwargs)
    corpus = generated_corpus(model, tokenizer, n_samples=10, length=8, seed=0, batch_tokens=32)
    with caplog.at_level(logging.INFO, logger="sadr.data.corpus"):
        assert len(list(corpus.texts())) == 10 and rows == [4, 4, 2]
    assert "sampling 10 texts of 8 tokens from the model, 4 at a time" in caplog.text
    assert corpus.description["batch"] == 4
    assert generated_corpus(model, tokenizer, 10, 8, 0, batch_tokens=64).description["batch"] == 8
    assert generated_corpus(model, tokenizer, 10, 8, 0, batch_tokens=4).description["batch"] == 1


def test_a_generated_corpus_is_sampled_once_per_model_and_description_and_then_read_from_the_cache(tokenizer,
                                                                                                  tmp_path, caplog):
    """Another pass over the same corpus (other layers, a pass resumed after a stop, another process) reads the texts
    sampled first instead of sampling again: the same texts, whatever its threads. Another model fingerprint or
    another seed is another corpus, sampled afresh."""
    from sadr.data.corpus import generated_corpus

    model = make_model("llama").eval()
    batches = []
    generate = model.generate
    model.generate = lambda **kwargs: batches.append(kwargs["input_ids"].shape[0]) or generate(**kwargs)

    def texts(fingerprint="f", seed=0):
        corpus = generated_corpus(model, tokenizer, 6, 8, seed, batch_tokens=32, fingerprint=fingerprint,
                                  cache_dir=tmp_path)
        return list(corpus.texts())

    with caplog.at_level(logging.INFO, logger="sadr.data.corpus"):
        first = texts()
    assert len(first) == 6 and batches == [4, 2] and "(once: the texts are cached)" in caplog.text
    assert [entry.parent.name for entry in tmp_path.rglob("*.crc.json")] == ["corpora"]
    assert texts() == first and batches == [4, 2]
    assert texts(fingerprint="g") == first and batches == [4, 2] * 2  # same weights here, so the same draws
    assert texts(seed=1) != first and batches == [4, 2] * 3
    uncached = generated_corpus(model, tokenizer, 6, 8, 0, batch_tokens=32)
    assert list(uncached.texts()) == first and batches == [4, 2] * 4


def test_hub_corpus_streams_only_the_first_documents_and_refuses_another_way_of_sampling(tmp_path, monkeypatch):
    """`first` streams (the whole split of a large dataset is not downloaded for its first documents), `random` loads
    the split to draw from it; a sampling that is neither is an error, not silently taken as `random`."""
    import datasets

    from sadr.data.corpus import hub_corpus

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(kwargs["streaming"]) or iter(
        [{"text": "first document"}]))
    assert list(hub_corpus("wikimedia/wikipedia", None, "train", n_samples=1, sample="first").texts()) == [
        "first document"]
    assert calls == [True]
    with pytest.raises(ValueError, match=r"^hub corpus sample must be 'random' or 'first', got 'last'$"):
        hub_corpus("wikimedia/wikipedia", None, "train", n_samples=1, sample="last")


def test_a_file_corpus_is_its_nonempty_blank_line_separated_blocks(tmp_path):
    """Documents are the stripped blocks between blank lines (a block keeps its single newlines), empty ones skipped,
    the first `n` taken; size and mtime are in the description, so editing the file changes the statistics' key."""
    from sadr.data.corpus import file_corpus

    path = tmp_path / "corpus.txt"
    text = "first block\nline two\n\n\n\n  second block  \n\nthird"
    path.write_text(text, encoding="utf-8")
    corpus = file_corpus(str(path), n_samples=2)
    assert list(corpus.texts()) == ["first block\nline two", "second block"]
    assert corpus.description == {"kind": "file", "path": str(path.resolve()), "size": len(text.encode()),
                                  "mtime": path.stat().st_mtime, "n": 2}


def test_a_file_corpus_with_fewer_documents_than_asked_says_so(tmp_path, caplog):
    """A file of 2 documents for model.stats.n_samples=5 gives its 2, with a warning naming both counts: the results
    record n 5, which the statistics did not have."""
    from sadr.data.corpus import file_corpus

    path = tmp_path / "corpus.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="sadr.data.corpus"):
        assert list(file_corpus(str(path), n_samples=2).texts()) == ["one", "two"]
        assert not caplog.records
        assert list(file_corpus(str(path), n_samples=5).texts()) == ["one", "two"]
    assert [r.getMessage() for r in caplog.records] == [
        f"model.stats.text_file={path} holds 2 documents (blocks between blank lines), fewer than "
        "model.stats.n_samples=5: the key statistics are computed from those 2"]


def test_a_file_corpus_named_relative_to_the_working_folder_is_described_by_its_absolute_path(tmp_path, monkeypatch):
    """Two runs naming `corpus.txt` from different folders use different files: the description, and so the key of
    the statistics, holds the file's absolute path, not the name as given."""
    from sadr.data.corpus import file_corpus

    (tmp_path / "corpus.txt").write_text("a block", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert file_corpus("corpus.txt", n_samples=1).description["path"] == str(tmp_path.resolve() / "corpus.txt")


def test_a_file_corpus_without_its_file_names_the_setting(tmp_path):
    from sadr.data.corpus import file_corpus
    from sadr.errors import MissingInputError, UnavailableError

    with pytest.raises(UnavailableError, match=r"^model\.stats\.corpus=file needs model\.stats\.text_file=PATH$"):
        file_corpus(None, n_samples=2)
    with pytest.raises(MissingInputError, match=r"^statistics text file .*nope\.txt does not exist "
                                                r"\(model\.stats\.text_file\)$"):
        file_corpus(str(tmp_path / "nope.txt"), n_samples=2)


def test_a_generated_corpus_cycles_the_seed_words_with_its_seed(monkeypatch):
    """Prompts go round the twelve seed words; the corpus's seed reaches the sampler and its description."""
    from sadr.data import corpus as corpus_module

    calls = []

    def record(model, tokenizer, prompts, **kwargs):
        calls.append((prompts, kwargs))
        yield prompts, {}

    monkeypatch.setattr(corpus_module, "sampled_batches", record)
    corpus = corpus_module.generated_corpus(None, None, n_samples=14, length=8, seed=7, batch_tokens=32)
    words = ["The", "In", "A", "It", "When", "This", "There", "One", "After", "His", "Her", "According to"]
    assert list(corpus.texts()) == words + ["The", "In"]
    assert calls == [(words + ["The", "In"], {"max_new_tokens": 8, "seed": 7, "batch_size": 4, "rng_state": None})]
    assert corpus.description == {"kind": "generated", "n": 14, "length": 8, "seed": 7, "top_k": 5, "batch": 4}


@pytest.mark.parametrize("stop, periodic", [(KeyboardInterrupt, False), (RuntimeError, False), (RuntimeError, True)])
def test_a_stopped_sampling_of_a_generated_corpus_resumes_to_the_texts_of_one_never_stopped(stop, periodic, tmp_path,
                                                                                            tokenizer, monkeypatch):
    """7 texts sampled 2 at a time, stopped as the third batch begins: by Ctrl-C or SIGTERM, or by an error (a GPU out
    of memory, say), each of which keeps the 4 texts sampled; with a save after every batch, they are on disk before
    the stop. The rerun samples the last two batches only, from the random state the second left, to the texts of a
    sampling never stopped; the kept texts go once the corpus's entry is written."""
    from sadr.data import corpus as corpus_module

    model = make_model("llama")

    def corpus(cache):
        return corpus_module.generated_corpus(model, tokenizer, n_samples=7, length=6, seed=3, batch_tokens=12,
                                              fingerprint="f", cache_dir=cache)

    never_stopped = list(corpus(tmp_path / "fresh").texts())
    assert len(set(never_stopped)) > 1
    generate, calls, stops, on_disk = model.generate, [], [stop], []

    def stopping(*args, **kwargs):  # once: a rerun that sampled its third batch again fails, not the whole session
        calls.append(1)
        if len(calls) == 3 and stops:
            kept = (tmp_path / "cache").rglob("*.partial.pt")
            on_disk.extend(read_entry(partial, TORCH)["texts"] for partial in kept)
            raise stops.pop()()
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", stopping)
    if periodic:
        monkeypatch.setattr(corpus_module, "SAMPLING_CHECKPOINT_SECONDS", 0.0)
    with pytest.raises(stop):
        list(corpus(tmp_path / "cache").texts())
    assert on_disk == ([never_stopped[:4]] if periodic else [])
    (partial,) = (tmp_path / "cache" / "corpora").glob("*.partial.pt")
    assert read_entry(partial, TORCH)["texts"] == never_stopped[:4]
    calls.clear()
    assert list(corpus(tmp_path / "cache").texts()) == never_stopped
    assert len(calls) == 2 and not partial.exists()


def test_a_stop_while_a_sampled_batch_is_added_keeps_its_texts_with_the_random_state_after_them(tmp_path,
                                                                                                 monkeypatch):
    """Ctrl-C arriving as a batch's texts are added to those sampled is held until the random state after that batch
    is taken too: the kept file pairs the texts with the state that draws the next ones, never with the one that
    drew the last batch (a rerun would then draw texts that a sampling never stopped does not)."""
    import signal

    from sadr.data import corpus as corpus_module

    class Arriving:  # a batch's texts, Ctrl-C arriving once they are all added
        def __init__(self, texts):
            self.texts = texts

        def __iter__(self):
            yield from self.texts
            signal.raise_signal(signal.SIGINT)

    def batches(model, tokenizer, prompts, **kwargs):
        yield ["a", "b"], {"cpu": "after the first batch"}
        yield Arriving(["c", "d"]), {"cpu": "after the second batch"}
        raise AssertionError("sampled on after Ctrl-C")

    monkeypatch.setattr(corpus_module, "sampled_batches", batches)
    corpus = corpus_module.generated_corpus(None, None, n_samples=6, length=4, seed=3, batch_tokens=8,
                                            fingerprint="f", cache_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        list(corpus.texts())
    (partial,) = (tmp_path / "corpora").glob("*.partial.pt")
    assert read_entry(partial, TORCH) == {"texts": ["a", "b", "c", "d"], "rng": {"cpu": "after the second batch"}}


def test_the_random_state_a_sampling_resumes_from_holds_the_gpu_s_on_cuda(monkeypatch):
    """On CUDA the texts are drawn from the GPU's generator: the state kept after a batch, and set again before the
    next (or a resumed sampling's first), is the GPU's as well as the host's; the host's alone would resume a CUDA
    sampling to other texts. The GPU's generator is a stand-in here, so the test runs without one."""
    from sadr.models import generation

    gpu = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8), "devices": []}

    def get_rng_state(device):
        gpu["devices"].append(device)
        return gpu["state"].clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: gpu.update(state=state.clone(), set_on=device))
    device = torch.device("cuda", 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        state = generation._rng_state(device)
        assert torch.equal(state["cpu"], torch.get_rng_state()) and torch.equal(state["cuda"], torch.tensor([1, 2, 3]))
        assert gpu["devices"] == [device]
        torch.manual_seed(6)
        gpu["state"] = torch.tensor([7, 7, 7], dtype=torch.uint8)
        generation._set_rng_state(state, device)
        assert torch.equal(torch.get_rng_state(), state["cpu"])
        assert torch.equal(gpu["state"], torch.tensor([1, 2, 3], dtype=torch.uint8)) and gpu["set_on"] == device


def test_statistics_from_a_rome_npz_folder_are_read_per_module_and_sample_count_as_means(tmp_path, tokenizer):
    """`model.stats.npz_dir`: each layer's C is the file <module>_float32_mom2_<n>.npz of the configured n, mom2.mom2 /
    mom2.count; no corpus is read. Files of another n (ROME publishes several) are not taken."""
    model = make_model("gpt2")
    adapter = adapter_for(model)
    d = 4  # the shapes are not checked against the model's
    rng = np.random.default_rng(0)
    written = {}
    for layer in (1, 2):
        for n, count in ((100000, 7), (1000, 3)):
            keys = rng.normal(size=(2 * d, d)).astype(np.float32)
            total = keys.T @ keys
            np.savez(tmp_path / f"transformer.h.{layer}.mlp.c_proj_float32_mom2_{n}.npz",
                     **{"mom2.mom2": total, "mom2.count": np.array(count)})
            written[layer, n] = torch.from_numpy(total.astype(np.float64)) / count

    def never_read():
        raise AssertionError("the corpus was read although npz_dir was given")

    for n in (100000, 1000):
        stats = SecondMomentStatistics(model, adapter, tokenizer, fingerprint="f", corpus=Corpus({"kind": "t"}, never_read),
                                       sample_length=64, batch_tokens=256, cache_dir=tmp_path / "cache",
                                       npz_dir=str(tmp_path), npz_samples=n)
        got = stats.take([1, 2])
        for layer in (1, 2):
            assert got[layer].dtype == torch.float64
            torch.testing.assert_close(got[layer], written[layer, n], rtol=1e-12, atol=0)
        assert stats.description() == {"kind": "rome_npz", "dir": str(tmp_path), "n": n}


def test_a_rome_npz_folder_without_files_of_the_sample_count_is_refused_when_its_files_are_checked(tmp_path,
                                                                                                     tokenizer):
    """Before the unedited model is scored (minutes at paper scale), not when the editor first reads C: a folder that
    is not there, or holds ROME's files of other sample counts only, is named with the counts it holds; a folder no
    layer's C is read from is not checked."""
    model = make_model("gpt2")

    def statistics(folder, n):
        stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=None,
                                       sample_length=64, batch_tokens=256, cache_dir=tmp_path / "cache",
                                       npz_dir=str(folder), npz_samples=n)
        stats.check_files([1])
        return stats

    with pytest.raises(MissingInputError, match=r"model\.stats\.npz_dir=.*/absent is not a folder: give the folder of "
                                                r"ROME's statistics files"):
        statistics(tmp_path / "absent", 100000)
    SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=None, sample_length=64,
                           batch_tokens=256, cache_dir=tmp_path / "cache", npz_dir=str(tmp_path / "absent"),
                           npz_samples=100000).check_files([])
    folder = tmp_path / "npz"
    folder.mkdir()
    with pytest.raises(MissingInputError, match=r"holds no ROME statistics file of model\.stats\.n_samples=100000 "
                                                r"texts .*; it holds no such file, or unset model\.stats\.npz_dir"):
        statistics(folder, 100000)
    for n in (1000, 40):
        np.savez(folder / f"transformer.h.1.mlp.c_proj_float32_mom2_{n}.npz", **{"mom2.mom2": np.eye(2)})
    with pytest.raises(MissingInputError, match=r"its files are of <n> = 40, 1000: set model\.stats\.n_samples to one"):
        statistics(folder, 100000)
    assert statistics(folder, 40).description() == {"kind": "rome_npz", "dir": str(folder), "n": 40}


def test_a_rome_npz_folder_under_the_home_folder_is_read_as_it_is_checked(tmp_path, tokenizer, monkeypatch):
    """model.stats.npz_dir=~/...: the check at set-up expanded `~`, the reads did not, so a run that passed the check
    stopped at the first edit, after the unedited model was scored, on a file "~/npz/..." that does not exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    model = make_model("gpt2")
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "transformer.h.1.mlp.c_proj_float32_mom2_40.npz",
             **{"mom2.mom2": 4 * np.eye(2), "mom2.count": np.array(2)})
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=None,
                                   sample_length=64, batch_tokens=256, cache_dir=tmp_path / "cache",
                                   npz_dir="~/npz", npz_samples=40)
    torch.testing.assert_close(stats.take([1])[1], 2 * torch.eye(2, dtype=torch.float64))


def test_a_rome_npz_folder_under_the_home_folder_passes_the_set_up_check(tmp_path, monkeypatch):
    """The check at set-up expands `~` as the reads do: model.stats.npz_dir=~/npz is the folder $HOME/npz, which
    holds a file of the sample count, not a folder named '~' that is not there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "transformer.h.1.mlp.c_proj_float32_mom2_40.npz", **{"mom2.mom2": np.eye(2)})
    covariance.check_rome_npz_dir("~/npz", 40)
    with pytest.raises(MissingInputError, match=rf"npz_dir={tmp_path}/npz holds no ROME statistics file of "):
        covariance.check_rome_npz_dir("~/npz", 41)


def test_the_files_a_rome_npz_error_names_are_of_the_module_and_the_counts_in_order(tmp_path, tokenizer):
    """A missing layer's file is named beside that module's files only (another layer's would not do), and a folder
    without the sample count lists the counts it has in increasing order."""
    for layer, n in ((1, 9), (2, 9), (2, 2)):
        np.savez(tmp_path / f"transformer.h.{layer}.mlp.c_proj_float32_mom2_{n}.npz", **{"mom2.mom2": np.eye(2)})
    with pytest.raises(MissingInputError) as missing:
        load_rome_npz(tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_2.npz")
    assert "; the folder holds transformer.h.1.mlp.c_proj_float32_mom2_9.npz: set" in str(missing.value)
    model = make_model("gpt2")
    with pytest.raises(MissingInputError, match=r"its files are of <n> = 2, 9: set model\.stats\.n_samples to one"):
        SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=None, sample_length=64,
                               batch_tokens=256, cache_dir=tmp_path / "cache", npz_dir=str(tmp_path),
                               npz_samples=5).check_files([1])


@pytest.mark.parametrize("shipped", [(1,), (2,), (1, 2)])
def test_each_edited_layer_s_rome_file_is_checked_whatever_its_place(shipped, tmp_path, tokenizer):
    """check_files names the first edited layer without its file, wherever it comes in editor.layers."""
    model = make_model("gpt2")
    for layer in shipped:
        np.savez(tmp_path / f"transformer.h.{layer}.mlp.c_proj_float32_mom2_40.npz", **{"mom2.mom2": np.eye(2)})
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f", corpus=None,
                                   sample_length=64, batch_tokens=256, cache_dir=tmp_path / "cache",
                                   npz_dir=str(tmp_path), npz_samples=40)
    missing = [layer for layer in (1, 2) if layer not in shipped]
    if missing:
        with pytest.raises(MissingInputError, match=rf"transformer\.h\.{missing[0]}\.mlp\.c_proj_float32_mom2_40\.npz "
                                                    "does not exist"):
            stats.check_files([1, 2])
    else:
        stats.check_files([1, 2])
    stats.check_files([])


def test_the_statistics_text_file_is_named_by_its_setting_under_the_home_folder_too(tmp_path, monkeypatch):
    """model.stats.text_file=~/...: `~` expanded; an empty setting (model.stats.text_file=) is the missing setting."""
    from sadr.data.corpus import text_file
    from sadr.errors import UnavailableError

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("a block", encoding="utf-8")
    assert text_file("~/corpus.txt") == tmp_path / "corpus.txt"
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(MissingInputError, match=r"^statistics text file .*folder\.txt does not exist"):
        text_file(str(tmp_path / "folder.txt"))
    with pytest.raises(UnavailableError, match=r"^model\.stats\.corpus=file needs model\.stats\.text_file=PATH$"):
        text_file("")


class _KillableStatistics:
    """Statistics of one tiny llama over a corpus that stops with a KeyboardInterrupt at text `kill_after` (None:
    never), checkpointing after every batch."""

    def __init__(self, tokenizer, monkeypatch):
        monkeypatch.setattr(covariance, "CHECKPOINT_SECONDS", 0.0)
        self.model, self.tokenizer, self.texts, self.kill_after = make_model("llama"), tokenizer, random_texts(), 60

    def _corpus_texts(self):
        for i, text in enumerate(self.texts):
            if i == self.kill_after:
                raise KeyboardInterrupt
            yield text

    def __call__(self, cache_dir) -> SecondMomentStatistics:
        return SecondMomentStatistics(self.model, adapter_for(self.model), self.tokenizer, fingerprint="f",
                                      corpus=Corpus({"kind": "t"}, self._corpus_texts),
                                      sample_length=64, batch_tokens=128, cache_dir=cache_dir)


def test_a_pass_for_other_layers_does_not_resume_another_pass_s_checkpoint(tokenizer, tmp_path, monkeypatch):
    """The checkpoint of a killed pass over layers [1, 2] is not resumed by a pass over [1, 3] with the same model and
    corpus: layer 3's C counts every text, as an uninterrupted pass's."""
    stats = _KillableStatistics(tokenizer, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        stats(tmp_path / "a").take([1, 2])
    assert list((tmp_path / "a").rglob("*.partial.pt"))  # the killed pass left its checkpoint
    stats.kill_after = None
    resumed = stats(tmp_path / "a").take([1, 3])
    fresh = stats(tmp_path / "b").take([1, 3])
    for layer in (1, 3):
        torch.testing.assert_close(resumed[layer], fresh[layer], rtol=1e-6, atol=1e-9)


def test_ctrl_c_while_a_finished_pass_writes_its_cs_waits_for_every_layer_s_entry(tokenizer, tmp_path, monkeypatch):
    """A real SIGINT once the first layer's C is written: the pass's sums are in no checkpoint by then, and a rerun
    would start a new pass for the layers left, so every layer's C is written before the run stops."""
    import os
    import signal

    stats = _KillableStatistics(tokenizer, monkeypatch)
    stats.kill_after = None
    write = covariance.write_atomically

    def ctrl_c_after_a_c(value, path, kind):
        write(value, path, kind)
        if not path.name.endswith(".partial.pt"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(covariance, "write_atomically", ctrl_c_after_a_c)
    with pytest.raises(KeyboardInterrupt):
        stats(tmp_path).take([1, 2])
    assert len(list(tmp_path.rglob("model.*.pt"))) == 2 and not list(tmp_path.rglob("*.partial.pt"))


def _forward_widths(model, record):
    """A pre-hook on the embedding that records each forward's (rows, width)."""
    return model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: record.append(tuple(args[0].shape)))


def test_a_batch_may_hold_exactly_batch_tokens_tokens_and_not_one_more(tokenizer):
    """`batch_tokens` bounds the padded batch (rows × width): texts of L tokens with a budget of 2L go two by two,
    and with a budget of 2L - 1 one by one."""
    model = make_model("llama")
    length = 6
    texts = random_texts(n=4)
    assert all(len(tokenizer(t)["input_ids"]) >= length for t in texts)
    for budget, expected in ((2 * length, [(2, length)] * 2), (2 * length - 1, [(1, length)] * 4)):
        shapes = []
        handle = _forward_widths(model, shapes)
        try:
            accumulate_second_moments(model, adapter_for(model), tokenizer, [1], texts, sample_length=length,
                                      batch_tokens=budget)
        finally:
            handle.remove()
        assert shapes == expected, budget


@pytest.mark.parametrize(("width", "blocks"), [(37, 8), (50, 8), (20, 3)])
def test_an_upper_triangular_sum_rebuilt_from_its_state_goes_on_as_the_original(width, blocks):
    """A checkpoint's row blocks, the last one shorter (width not a multiple of the block height), give back a sum
    that keeps adding and ends as kᵀk computed at once."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(40, width, generator=g, dtype=torch.float64)
    total = covariance.UpperTriangularSum(width, torch.device("cpu"), blocks)
    total.add(keys[:15])
    heights = [rows.shape[0] for rows in total.state()]
    assert len(set(heights)) > 1  # the last block is shorter: the case where the starts must come from the heights
    resumed = covariance.UpperTriangularSum.of([rows.clone() for rows in total.state()], torch.device("cpu"))
    resumed.add(keys[15:])
    torch.testing.assert_close(resumed.take_full(), keys.T @ keys, rtol=1e-12, atol=1e-12)


def test_a_corpus_with_exactly_as_many_tokens_as_key_dimensions_gives_c(tmp_path, tokenizer):
    """The bound is strict: with d tokens C can be full rank, so it is computed and cached; with fewer it cannot."""
    model = make_model("llama")
    d = model.config.intermediate_size
    per_text = 4
    texts = random_texts(n=d // per_text)
    assert d % per_text == 0 and all(len(tokenizer(t)["input_ids"]) >= per_text for t in texts)

    def stats(tag, corpus_texts):
        return SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f",
                                      corpus=Corpus({"kind": "test", "tag": tag}, lambda: iter(corpus_texts)),
                                      sample_length=per_text, batch_tokens=256, cache_dir=tmp_path)

    moment = stats("exact", texts).take([1])[1]
    direct = accumulate_second_moments(model, adapter_for(model), tokenizer, [1], texts, sample_length=per_text,
                                       batch_tokens=256)
    assert direct.count == d
    torch.testing.assert_close(moment, direct.take_moment(1), rtol=1e-12, atol=1e-12)
    assert len(list((tmp_path / "stats").glob("*.pt"))) == 1
    with pytest.raises(InvalidSettingError, match=rf"gave {d - per_text} tokens, fewer than the {d} dimensions"):
        stats("short", texts[:-1]).take([1])
    assert len(tokenizer("the cat")["input_ids"]) == per_text - 1
    with pytest.raises(InvalidSettingError, match=rf"gave {d - 1} tokens, fewer than the {d} dimensions"):
        stats("one short", texts[:-1] + ["the cat"]).take([1])  # one token fewer than d


def test_empty_texts_add_no_tokens_and_no_rows(tokenizer):
    """A text with no tokens (gpt2's tokenizer adds none to "") is skipped: the sums are those of the other texts, and
    a corpus of empty texts only is the clear no-tokens error."""
    model = make_model("gpt2")
    assert tokenizer("")["input_ids"] == []
    shapes = []
    handle = _forward_widths(model, shapes)
    try:
        with_empty = accumulate_second_moments(model, adapter_for(model), tokenizer, [1],
                                               ["", TEXTS[0], "", TEXTS[1], ""],
                                               sample_length=64, batch_tokens=4096)
    finally:
        handle.remove()
    plain = accumulate_second_moments(model, adapter_for(model), tokenizer, [1], TEXTS[:2], sample_length=64,
                                      batch_tokens=4096)
    assert shapes[0][0] == 2 and with_empty.count == plain.count
    torch.testing.assert_close(with_empty.take_moment(1), plain.take_moment(1), rtol=1e-12, atol=1e-12)
    with pytest.raises(InvalidSettingError, match="produced no tokens"):
        accumulate_second_moments(model, adapter_for(model), tokenizer, [1], ["", ""], sample_length=64,
                                  batch_tokens=4096)


def test_keys_are_converted_at_most_chunk_bytes_of_float64_at_a_time(tokenizer, monkeypatch):
    """CHUNK_BYTES bounds each conversion: with room for 5 float64 keys, every chunk added has at most 5 rows and
    the chunks cover every token once."""
    model = make_model("llama")
    d = model.config.intermediate_size
    monkeypatch.setattr(covariance, "CHUNK_BYTES", 8 * d * 5)
    rows = []
    add = covariance.UpperTriangularSum.add
    monkeypatch.setattr(covariance.UpperTriangularSum, "add",
                        lambda self, keys: (rows.append(keys.shape[0]), add(self, keys))[1])
    result = accumulate_second_moments(model, adapter_for(model), tokenizer, [1], TEXTS, sample_length=64,
                                       batch_tokens=4096)
    assert max(rows) == 5 and sum(rows) == result.count


def test_a_checkpoint_from_another_device_is_not_resumed(tokenizer, tmp_path, monkeypatch, caplog):
    """A pass's identity holds its device: sums a killed pass left from another device (here a GPU)
    are not resumed on this one, whose pass starts afresh and ends with the sums of an uninterrupted pass."""
    stats = _KillableStatistics(tokenizer, monkeypatch)
    # the killed pass takes its model to be on a GPU (it is killed before anything else asks for the device)
    with monkeypatch.context() as on_cuda:
        on_cuda.setattr(SecondMomentStatistics, "_device", lambda self: torch.device("cuda"))
        with pytest.raises(KeyboardInterrupt):
            stats(tmp_path / "a").take([1])
    assert list((tmp_path / "a").rglob("*.partial.pt"))
    stats.kill_after = None
    rebuilt = []
    of = covariance.UpperTriangularSum.of
    monkeypatch.setattr(covariance.UpperTriangularSum, "of", lambda rows, device: rebuilt.append(1) or of(rows, device))
    with caplog.at_level(logging.INFO, logger="sadr.editors.covariance"):
        again = stats(tmp_path / "a").take([1])
    assert not rebuilt and "another pass's checkpoint" in caplog.text and "resuming" not in caplog.text
    torch.testing.assert_close(again[1], stats(tmp_path / "b").take([1])[1], rtol=1e-12, atol=1e-12)


def _texts_then_ctrl_c(n):
    """The first `n` of TEXTS, then a Ctrl-C where the next text would come."""
    yield from TEXTS[:n]
    raise KeyboardInterrupt


def test_a_stopped_pass_saves_the_texts_of_its_finished_batches_and_nothing_before_its_first(tokenizer, tmp_path):
    """With no save due (every_seconds of an hour), a stop saves the sums only where a batch finished since the pass
    began: stopped after one text of one-text batches, that text is kept; stopped before any batch finished, nothing is
    written (an empty checkpoint would cost a write of GBs at a published model's width and save no work)."""
    model = make_model("llama")
    checkpoint = covariance.PassCheckpoint(tmp_path / "pass.partial.pt", {"layers": [1]}, every_seconds=3600.0)

    def run(texts):
        with pytest.raises(KeyboardInterrupt):  # batch_tokens=1: each text is a batch of its own
            accumulate_second_moments(model, adapter_for(model), tokenizer, [1], texts, sample_length=64,
                                      batch_tokens=1, checkpoint=checkpoint)

    run(_texts_then_ctrl_c(1))  # its one text still pending: no batch finished
    assert not checkpoint.path.exists()
    run(_texts_then_ctrl_c(2))  # the first text's batch finished when the second came
    kept = read_entry(checkpoint.path, TORCH)
    assert kept["texts"] == 1 and kept["count"] == len(tokenizer(TEXTS[0])["input_ids"])


def test_a_pass_saves_its_sums_every_every_seconds_counted_from_its_last_save(tokenizer, tmp_path, monkeypatch):
    """On a clock that reads 1 s more at each text, one-text batches and a save due every 2.5 s: the batch boundaries
    come at 2, 3, ... s, so the saves come after texts 2 (at 3 s) and 5 (at 6 s), not after every batch once the
    first save is made."""
    import types

    model = make_model("llama")
    now = [0.0]
    monkeypatch.setattr(covariance, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    checkpoint = covariance.PassCheckpoint(tmp_path / "pass.partial.pt", {"layers": [1]}, every_seconds=2.5)
    saved = []
    monkeypatch.setattr(checkpoint, "save", lambda texts, *args: saved.append(texts))

    def ticking():
        for text in (TEXTS * 2):
            now[0] += 1
            yield text

    accumulate_second_moments(model, adapter_for(model), tokenizer, [1], ticking(), sample_length=64, batch_tokens=1,
                              checkpoint=checkpoint)
    assert saved == [2, 5]


def test_a_resumed_pass_s_timing_adds_the_seconds_its_checkpoint_holds(tokenizer, tmp_path):
    """The time a pass reports is the whole pass's: a resumed pass adds its seconds to those its checkpoint saved."""
    model = make_model("llama")
    checkpoint = covariance.PassCheckpoint(tmp_path / "pass.partial.pt", {"layers": [1]}, every_seconds=3600.0)

    def run(texts):
        return accumulate_second_moments(model, adapter_for(model), tokenizer, [1], texts, sample_length=64,
                                         batch_tokens=1, checkpoint=checkpoint)

    with pytest.raises(KeyboardInterrupt):
        run(_texts_then_ctrl_c(3))
    state = read_entry(checkpoint.path, TORCH)
    state["seconds"] = {"forward": 1000.0, "accumulate": 2000.0, "corpus": 3000.0}  # as if hours had been spent
    covariance.write_atomically(state, checkpoint.path, TORCH)
    seconds = run(TEXTS).seconds
    assert 1000 <= seconds["forward"] < 1100 and 2000 <= seconds["accumulate"] < 2100
    assert 3000 <= seconds["corpus"] < 3100


def test_a_cached_c_is_read_without_waiting_for_the_lock_of_a_pass(tmp_path, tokenizer, monkeypatch):
    """Another job may hold the pass's lock for hours while it computes other layers: a layer whose C is cached is read
    at once, and the lock is taken only for the layers to compute."""
    model = make_model("llama")
    stats = SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="f",
                                   corpus=Corpus({"kind": "t"}, lambda: iter(random_texts())), sample_length=64,
                                   batch_tokens=256, cache_dir=tmp_path)
    computed = stats.take([1])[1]
    monkeypatch.setattr(covariance, "lock_for", lambda path: pytest.fail(f"waited for {path} with C cached"))
    assert torch.equal(stats.take([1])[1], computed)
