"""Shared caches: computed once across concurrent jobs, never read half-written, damaged entries repaired,
keyed by content rather than by where a model was loaded from."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from tokenizers import normalizers
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

from sadr import cache
from sadr.cache import JSON, TORCH, cached, lock_for, read_entry, write_atomically
from sadr.errors import InvalidSettingError
from sadr.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from sadr.models.loading import load_model
from sadr.models.tokenization import pad_id_of
from tests.runs import tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)
from tests.tiny_models import make_model, make_sentencepiece_tokenizer, make_tokenizer


def _slow_compute_once(path, counter, start):
    def compute():
        with open(counter, "a") as f:
            f.write("computed\n")
        time.sleep(1.0)
        return {"value": 42}

    while time.time() < start:
        time.sleep(0.005)
    assert cached(path, compute) == {"value": 42}


def test_jobs_started_together_compute_an_entry_once(tmp_path):
    path, counter, start = tmp_path / "entry.json", tmp_path / "counter", time.time() + 1.0
    context = multiprocessing.get_context("fork")
    jobs = [context.Process(target=_slow_compute_once, args=(path, counter, start)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0, 0, 0]
    assert counter.read_text() == "computed\n"


def _hold_the_lock_forever(path, ready):
    with lock_for(path):
        ready.set()
        time.sleep(600)


def test_the_lock_of_a_job_that_crashed_is_released(tmp_path):
    path = tmp_path / "entry.json"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_the_lock_forever, args=(path, ready))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    started = time.monotonic()
    assert cached(path, lambda: [1, 2]) == [1, 2]
    assert time.monotonic() - started < 10


def test_a_damaged_entry_is_named_removed_and_computed_again(tmp_path, caplog):
    path = tmp_path / "stats.pt"
    torch.save({"mom2": torch.eye(3)}, path)
    path.write_bytes(path.read_bytes()[:50])  # a copy cut short
    with caplog.at_level(logging.WARNING, logger="sadr.cache"):
        value = cached(path, lambda: {"mom2": torch.ones(2)}, TORCH)
    assert torch.equal(value["mom2"], torch.ones(2))
    assert str(path) in caplog.text and "damaged" in caplog.text
    assert torch.equal(torch.load(path)["mom2"], torch.ones(2))


def test_an_entry_with_a_changed_byte_is_found_by_its_crc_and_computed_again(tmp_path, caplog):
    path = tmp_path / "stats.pt"
    write_atomically({"mom2": torch.arange(64, dtype=torch.float64)}, path, TORCH)
    content = bytearray(path.read_bytes())
    at = content.index(torch.arange(64, dtype=torch.float64).numpy().tobytes())  # the tensor's own bytes
    content[at + 100] ^= 0x01  # one bit of one element: torch.load alone returns the changed tensor
    path.write_bytes(content)
    assert not torch.equal(torch.load(path)["mom2"], torch.arange(64, dtype=torch.float64))
    with caplog.at_level(logging.WARNING, logger="sadr.cache"):
        value = cached(path, lambda: {"mom2": torch.ones(2)}, TORCH)
    assert torch.equal(value["mom2"], torch.ones(2)) and "does not match its CRC-32" in caplog.text


def test_a_json_entry_with_a_changed_digit_is_found_by_its_crc_and_computed_again(tmp_path, caplog):
    path = tmp_path / "unedited.json"
    scores = {"p_new": [0.125, 0.5], "text": "Tōkyō"}
    write_atomically(scores, path, JSON)
    assert read_entry(path, JSON) == scores  # the value read back whole, non-ASCII text included
    path.write_text(path.read_text(encoding="utf-8").replace("0.125", "0.126"), encoding="utf-8")  # still valid JSON
    with caplog.at_level(logging.WARNING, logger="sadr.cache"):
        assert cached(path, lambda: {"recomputed": True}) == {"recomputed": True}
    assert "does not match its CRC-32" in caplog.text


@pytest.mark.parametrize("content, recomputed", [('["{}", "The {}"]', ["{}"]),  # a list, as templates are
                                                 ('{"p_new": [0.125], "p_true": [0.5]}', {"p_new": [0.25]}),
                                                 ('{"value": [0.125]}', {"value": [0.25]})])  # a key named value
def test_a_json_entry_without_its_crc_is_damage_and_computed_again(tmp_path, caplog, content, recomputed):
    """A bare JSON value at an entry's path (a hand-made or foreign file; sadr's own older entries have other names)
    is named as lacking its CRC-32, also when it is an object (not as a KeyError), and computed again."""
    path = tmp_path / f"entry{JSON.suffix}"
    path.write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="sadr.cache"):
        assert cached(path, lambda: recomputed) == recomputed
    assert "no CRC-32 beside its value" in caplog.text and "KeyError" not in caplog.text
    assert read_entry(path, JSON) == recomputed


def test_what_a_killed_writer_left_is_removed_when_the_entry_is_written(tmp_path):
    path = tmp_path / "stats[1].pt"  # a name with glob characters
    stale = tmp_path / "stats[1].pt.k3j2x9.tmp"
    stale.write_bytes(b"half of a large entry")
    other = tmp_path / "stats[2].pt.a8b7c6.tmp"  # another entry's: not this writer's to judge
    other.write_bytes(b"")
    cached(path, lambda: {"mom2": torch.eye(2)}, TORCH)
    assert not stale.exists() and other.exists() and path.is_file()


def test_an_entry_is_never_left_half_written(tmp_path):
    path = tmp_path / "entry.json"

    def save_then_fail(value, target):
        target.write_text('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically({"half": 1}, path, dataclasses.replace(JSON, save=save_then_fail))
    assert list(tmp_path.iterdir()) == []


def test_an_entry_interrupted_while_written_leaves_no_temporary_file(tmp_path):
    """Ctrl-C (a KeyboardInterrupt, not an Exception) during a write removes its temporary file, as large as the entry,
    and still stops the job."""
    path = tmp_path / "stats.pt"

    def save_then_interrupt(value, target):
        torch.save(value, target)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically({"mom2": torch.eye(2)}, path, dataclasses.replace(TORCH, save=save_then_interrupt))
    assert list(tmp_path.iterdir()) == []


def test_a_file_s_sha256_covers_all_of_a_file_longer_than_a_read(tmp_path):
    """Files are read 8 MiB at a time: a byte after the first read changes the digest, as hashlib's gives it."""
    from sadr.cache import file_sha256

    data = bytearray(b"x" * ((1 << 23) + 5))
    (tmp_path / "a").write_bytes(data)
    data[-1:] = b"y"
    (tmp_path / "b").write_bytes(data)
    assert file_sha256(tmp_path / "b") == hashlib.sha256(data).hexdigest() != file_sha256(tmp_path / "a")


def test_a_writable_folder_is_made_with_its_parents_and_under_the_home_folder(tmp_path, monkeypatch):
    from sadr.cache import writable_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    assert writable_dir("~/a/b", "cache_dir") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []


def test_a_folder_that_cannot_be_written_in_names_the_override_that_sets_it(tmp_path):
    from sadr.cache import writable_dir
    from sadr.errors import InvalidSettingError

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InvalidSettingError, match=r"cannot write in .*file/run \(output_dir\): .*; set "
                                                  r"hydra\.run\.dir=<a folder this user can write in>$"):
        writable_dir(tmp_path / "file" / "run", "output_dir", "hydra.run.dir")


def test_a_folder_that_exists_but_refuses_new_files_is_named(tmp_path, monkeypatch):
    """Writing is tried, not only the folder made (a read-only mount; checked by refusing the try, as root may write
    in any folder)."""
    from sadr.cache import writable_dir
    from sadr.errors import InvalidSettingError

    def refused(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache.tempfile, "TemporaryFile", refused)
    with pytest.raises(InvalidSettingError, match=r"cannot write in .* \(cache_dir\): Permission denied; "
                                                  r"set cache_dir="):
        writable_dir(tmp_path, "cache_dir")


def _killed_while_writing(path):
    def save(value, file):
        file.write_text("half an entry")
        os.kill(os.getpid(), signal.SIGKILL)

    write_atomically([1], path, dataclasses.replace(JSON, save=save))


def test_the_temporary_file_of_a_writer_killed_mid_write_is_removed_by_the_next_write(tmp_path):
    """A real kill (SIGKILL: no cleanup runs) leaves write_atomically's own temporary file; the next write of the entry
    removes it, so only the entry is left."""
    path = tmp_path / f"entry{JSON.suffix}"
    writer = multiprocessing.get_context("fork").Process(target=_killed_while_writing, args=(path,))
    writer.start()
    writer.join(30)
    assert writer.exitcode == -signal.SIGKILL and len(list(tmp_path.iterdir())) == 1  # its temporary file
    write_atomically([2], path, JSON)
    assert list(tmp_path.iterdir()) == [path] and read_entry(path, JSON) == [2]


def test_a_folder_where_an_entry_would_be_is_no_entry_and_is_left_alone(tmp_path):
    (tmp_path / "entry.pt").mkdir()
    assert read_entry(tmp_path / "entry.pt", TORCH) is None and (tmp_path / "entry.pt").is_dir()


def test_a_damaged_entry_read_alone_is_removed(tmp_path, caplog):
    """Reading a damaged entry removes it (with a warning), also when nothing computes it again: a computation that
    then fails or is stopped leaves no damaged entry to be warned about on every later read."""
    path = tmp_path / "stats.pt"
    path.write_bytes(b"PK\x03\x04 cut short")
    with caplog.at_level(logging.WARNING, logger="sadr.cache"):
        assert read_entry(path, TORCH) is None
    assert not path.exists() and "damaged" in caplog.text


def test_entries_are_readable_as_any_new_file_and_another_user_s_entry_is_left_alone(tmp_path, monkeypatch):
    """A cache shared by a group: entries get the umask's mode (not mkstemp's owner-only one), and an entry this user
    may not read is an error naming it, never taken for damage and deleted."""
    path = tmp_path / "entry.json"
    old = os.umask(0o027)
    try:
        cache.new_file_mode.cache_clear()
        write_atomically({"a": 1}, path, JSON)
    finally:
        os.umask(old)
        cache.new_file_mode.cache_clear()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    def denied(_path):
        raise PermissionError(13, "Permission denied")

    with pytest.raises(InvalidSettingError, match=r"cannot read the cache entry .*entry\.json \(Permission denied\): "
                                                  r"this user may not read it.*cache_dir="):
        read_entry(path, dataclasses.replace(JSON, load=denied))
    assert path.is_file()


def test_the_umask_read_without_proc_is_left_as_it_was(monkeypatch):
    """Where /proc cannot be read, the umask is read by setting it for a moment: it is then set back, or every later
    file of the process would be written with mode 0o666."""
    def no_proc(*_args):
        raise OSError("no /proc")

    monkeypatch.setattr(cache, "Path", no_proc)
    old = os.umask(0o027)
    try:
        cache.new_file_mode.cache_clear()
        assert cache.new_file_mode() == 0o640
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)
        cache.new_file_mode.cache_clear()


def test_a_fingerprint_s_sums_are_taken_in_chunks_without_changing_them():
    from sadr.models.fingerprint import _float64_sums

    param = torch.randn(1000, 7)
    whole = param.double()
    total, squares = _float64_sums(param, chunk=999)  # 8 chunks, the last one short
    assert total == pytest.approx(whole.sum().item(), rel=1e-12) and squares == pytest.approx(whole.square().sum().item(), rel=1e-12)


def test_the_same_weights_from_two_folders_have_one_fingerprint(tmp_path):
    model = make_model("llama")
    for folder in ("a", "b/c"):
        model.save_pretrained(tmp_path / folder)
        make_tokenizer().save_pretrained(tmp_path / folder)
    a = load_model(str(tmp_path / "a"), device="cpu", cache_dir=str(tmp_path))
    b = load_model(str(tmp_path / "b" / "c"), device="cpu", cache_dir=str(tmp_path))
    assert a.model.config.name_or_path != b.model.config.name_or_path
    assert model_fingerprint(a.model) == model_fingerprint(b.model)
    with torch.no_grad():
        b.adapter.down_weight(b.model, 0)[0, 0] += 1e-3
    assert model_fingerprint(a.model) != model_fingerprint(b.model)


def test_a_tokenizer_s_fingerprint_is_its_content_not_its_folder(tmp_path):
    """The same tokenizer files in two folders give one fingerprint; one that splits text otherwise (Llama-2's legacy
    normalizer in place of its pre-tokenizer) or has another special token gives another. The pad token does not
    count: it fills masked positions only, and `pad_id_of` (at loading) gives a tokenizer without one its EOS token."""
    make_sentencepiece_tokenizer().save_pretrained(tmp_path / "a")
    make_sentencepiece_tokenizer().save_pretrained(tmp_path / "b" / "c")
    a, b = (AutoTokenizer.from_pretrained(tmp_path / folder) for folder in ("a", "b/c"))
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(make_sentencepiece_tokenizer(legacy=True)) != tokenizer_fingerprint(a)
    assert b.pad_token is None and pad_id_of(b) == b.eos_token_id
    assert tokenizer_fingerprint(b) == tokenizer_fingerprint(a)
    b.unk_token = b.eos_token
    assert tokenizer_fingerprint(b) != tokenizer_fingerprint(a)
    before = tokenizer_fingerprint(a)
    a.clean_up_tokenization_spaces = not a.clean_up_tokenization_spaces  # decoded texts: sampled templates, corpora
    assert tokenizer_fingerprint(a) != before


def test_a_tokenizer_s_fingerprint_counts_its_class_and_without_a_backend_its_vocabulary():
    """Two tokenizers of one `tokenizers` definition and special tokens but of classes that decode otherwise differ;
    so do two tokenizers without a `tokenizers` definition (ByT5's, bytes in Python) whose vocabularies differ by an
    added token, which encodes the same text into other ids."""
    class LowerCaseDecoding(PreTrainedTokenizerFast):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).lower()

    backend = make_sentencepiece_tokenizer().backend_tokenizer
    plain, lowered = (kind(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
                      for kind in (PreTrainedTokenizerFast, LowerCaseDecoding))
    assert plain.backend_tokenizer.to_str() == lowered.backend_tokenizer.to_str()
    assert plain.special_tokens_map == lowered.special_tokens_map
    ids = plain("The Eiffel Tower").input_ids
    assert plain.decode(ids) != lowered.decode(ids)
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(lowered)

    bytes_only, with_a_word = ByT5Tokenizer(), ByT5Tokenizer()
    with_a_word.add_tokens(["Paris"])
    assert getattr(bytes_only, "backend_tokenizer", None) is None
    assert bytes_only.special_tokens_map == with_a_word.special_tokens_map
    assert bytes_only("Paris").input_ids != with_a_word("Paris").input_ids
    assert tokenizer_fingerprint(bytes_only) == tokenizer_fingerprint(ByT5Tokenizer())
    assert tokenizer_fingerprint(bytes_only) != tokenizer_fingerprint(with_a_word)


def test_environment_json_records_the_tokenizer_s_fingerprint(tiny_dir, tmp_path):
    """environment.json names the tokenizer the run's caches were keyed by, beside the weights: the fingerprint of
    the model folder's tokenizer files, as loaded on their own."""
    from sadr.runner import Experiment
    from tests.runs import composed

    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run")))
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    expected = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_dir / "model"))
    assert environment["tokenizer_fingerprint"] == expected == experiment.tokenizer_fingerprint
    assert environment["model_fingerprint"] == experiment.fingerprint


def test_the_next_run_in_the_process_finds_the_first_run_s_entries(tiny_dir, tmp_path, caplog):
    """The jobs of a basic-launcher sweep share the loaded model and tokenizer (here saved without a pad token, which
    loading gives it): the second keys its computations as the first did, so it computes no key statistics again."""
    from sadr.models import kept
    from sadr.runner import Experiment
    from tests.runs import composed

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    kept.release_kept_model()
    runs = []
    with caplog.at_level(logging.INFO, logger="sadr.editors.covariance"):
        for name in ("first", "second"):
            runs.append(Experiment(composed(tiny_overrides(tiny_dir, tmp_path / name, f"model.source={folder}",
                                                           f"cache_dir={tmp_path / 'cache'}", "dataset.limit=1"))))
            runs[-1].run()
    first, second = runs
    assert second.loaded.tokenizer is first.loaded.tokenizer and first.loaded.tokenizer.pad_token is not None
    assert second.computed_by == first.computed_by
    assert caplog.text.count("computing key statistics") == 1
    kept.release_kept_model()


def test_new_tokenizer_files_beside_the_same_weights_key_the_caches_apart(tiny_dir, tmp_path):
    """A model folder whose tokenizer files were replaced (here: text lower-cased first) keeps its weights'
    fingerprint, but none of the earlier tokenizer's cached templates, statistics or unedited scores is read."""
    from sadr.runner import Experiment
    from tests.runs import composed

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", folder)
    overrides = lambda run: tiny_overrides(tiny_dir, tmp_path / run, f"model.source={folder}")  # noqa: E731
    first = Experiment(composed(overrides("first")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.save_pretrained(folder)
    second = Experiment(composed(overrides("second")))
    assert second.fingerprint == first.fingerprint
    assert second.tokenizer_fingerprint != first.tokenizer_fingerprint and second.computed_by != first.computed_by
    assert second.statistics.fingerprint == second.computed_by


def test_a_fingerprint_tells_apart_a_changed_config_and_any_changed_weight():
    """The config (here RoPE's base) counts as well as the weights; a change that keeps a weight's sum (+x and -x
    swapped for +2x and -2x) is told by its sum of squares; a one-ulp change of one weight by the sums' digits."""
    model = make_model("llama")
    weight = model.model.layers[1].mlp.down_proj.weight
    weight[0, :2] = torch.tensor([0.25, -0.25])
    before = model_fingerprint(model)
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_theta": 5000.0}
    assert model_fingerprint(model) != before
    model = make_model("llama")
    weight = model.model.layers[1].mlp.down_proj.weight
    weight[0, :2] = torch.tensor([0.5, -0.5])
    assert model_fingerprint(model) != before
    weight[0, :2] = torch.tensor([0.25, -0.25])
    assert model_fingerprint(model) == before
    weight[0, 2] = torch.nextafter(weight[0, 2], torch.tensor(1.0))
    assert model_fingerprint(model) != before


def test_two_runs_started_together_on_an_empty_cache_compute_the_statistics_once(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "sadr.cli.run", *tiny_overrides(tiny_dir, tmp_path / f"run{i}"),
                              f"cache_dir={cache}", "dataset.limit=1"], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert sum(log.count("computing key statistics") for log in logs) == 1
    assert all((tmp_path / f"run{i}" / "metrics.csv").is_file() for i in range(2))


def test_an_empty_entry_is_read_back_not_computed_again(tmp_path):
    """An empty list or dict is a result like any other: only a missing or damaged entry is computed."""
    computed = []
    for empty in ([], {}):
        path = tmp_path / f"{type(empty).__name__}.json"
        for _ in range(2):
            assert cached(path, lambda empty=empty: computed.append(path.name) or empty) == empty
    assert computed == ["list.json", "dict.json"]


def test_an_entry_is_written_beside_its_final_name(tmp_path):
    """Its temporary file is renamed onto the entry, which works only within one file system: written elsewhere (the
    system's temporary folder on another disk), the rename fails."""
    folders = []

    def save(value, target):
        folders.append(target.parent)
        JSON.save(value, target)

    write_atomically({"a": 1}, tmp_path / "kind" / "entry.json", dataclasses.replace(JSON, save=save))
    assert folders == [tmp_path / "kind"] and read_entry(tmp_path / "kind" / "entry.json", JSON) == {"a": 1}


def test_unedited_results_are_computed_again_for_other_weights_cases_or_evaluators(tmp_path, monkeypatch):
    """Cached under the model's fingerprint, every field of every case (a target changed under the same case id)
    and each evaluator's identity: any one of them changed must not reuse another's scores."""
    import sadr.runner as runner
    from sadr.data.records import EditCase, EditRequest

    calls = []

    def evaluate_all(evaluators, model, tokenizer, adapter, cases):
        calls.append([case.request.target_new for case in cases])
        return [{"target": case.request.target_new, "k": [e.identity()["k"] for e in evaluators]} for case in cases]

    class Evaluator:
        def __init__(self, k):
            self.k = k

        def identity(self):
            return {"name": "probe", "k": self.k}

    monkeypatch.setattr(runner, "evaluate_all", evaluate_all)
    loaded = SimpleNamespace(model=None, tokenizer=None, adapter=None)
    rome, oslo = (EditCase(0, EditRequest("{} is in", "Paris", target)) for target in ("Rome", "Oslo"))
    settings = [([rome], 1, "w"), ([oslo], 1, "w"), ([rome], 2, "w"), ([rome], 1, "other weights")]
    for cases, k, fingerprint in settings * 2:
        results = runner.unedited_results(loaded, cases, [Evaluator(k)], fingerprint, str(tmp_path))
        assert results == [{"target": cases[0].request.target_new, "k": [k]}]
    assert calls == [["Rome"], ["Oslo"], ["Rome"], ["Rome"]]


def test_an_entry_is_computed_while_another_entry_of_its_folder_is_being_computed(tmp_path):
    """Locks are per entry: a job computing one entry (a statistics pass: minutes) holds up no job that needs another
    entry of the same folder."""
    import threading

    done = []
    with lock_for(tmp_path / "stats" / "a.pt"):  # another job computing entry a
        worker = threading.Thread(target=lambda: done.append(cached(tmp_path / "stats" / "b.crc.json", lambda: [1, 2])),
                                  daemon=True)
        worker.start()
        worker.join(timeout=5)
        assert done == [[1, 2]]
    worker.join()


def test_a_fingerprint_tells_apart_the_same_values_held_in_another_dtype():
    """Weights whose values bfloat16 holds exactly, once in float32 and once cast to bfloat16 (the config, unchanged
    by `.to`, is the same): the models compute differently, so their caches must not be shared."""
    model = make_model("llama")
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    as_float32 = model_fingerprint(model)
    model.to(torch.bfloat16)
    assert model.config.to_dict() == make_model("llama").config.to_dict()  # only the parameters' dtype differs
    assert model_fingerprint(model) != as_float32


def test_a_fingerprint_tells_apart_a_parameter_of_another_shape_with_the_same_values():
    model = make_model("llama")
    before = model_fingerprint(model)
    weight = model.model.layers[1].mlp.down_proj.weight
    weight.data = weight.data.reshape(weight.shape[1], weight.shape[0])  # same values and sums, transposed shape
    assert model_fingerprint(model) != before


class ProbeEvaluator:
    def identity(self):
        return {"name": "probe"}


def _probe_cases(n: int):
    from sadr.data.records import EditCase, EditRequest

    return [EditCase(i, EditRequest("{} is in", f"City {i}", f"Country {i}")) for i in range(n)]


def test_unedited_results_are_cached_a_chunk_at_a_time_and_a_stopped_scoring_keeps_its_chunks(tmp_path, monkeypatch,
                                                                                               caplog):
    """5 cases in chunks of 2: three entries. Stopped (Ctrl-C) in the second chunk, the first is kept, and the rerun
    scores only the chunks after it; then everything is read back, in order."""
    import sadr.runner as runner

    calls, stop_at = [], [2]

    def evaluate_all(evaluators, model, tokenizer, adapter, cases):
        calls.append([case.case_id for case in cases])
        if len(calls) in stop_at:
            raise KeyboardInterrupt
        return [{"case": case.case_id} for case in cases]

    monkeypatch.setattr(runner, "evaluate_all", evaluate_all)
    monkeypatch.setattr(runner, "UNEDITED_CHUNK", 2)
    loaded, cases = SimpleNamespace(model=None, tokenizer=None, adapter=None), _probe_cases(5)
    with pytest.raises(KeyboardInterrupt):
        runner.unedited_results(loaded, cases, [ProbeEvaluator()], "w", str(tmp_path))
    assert calls == [[0, 1], [2, 3]] and len(list((tmp_path / "unedited").glob("*.json"))) == 1
    stop_at.clear()
    for _ in range(2):
        with caplog.at_level(logging.INFO, logger="sadr.progress"):
            assert runner.unedited_results(loaded, cases, [ProbeEvaluator()], "w", str(tmp_path), progress=True) == [
                {"case": i} for i in range(5)]
        assert "scoring the unedited model: 100%" in caplog.text  # logged, several chunks being scored
    assert calls == [[0, 1], [2, 3], [2, 3], [4]]  # the first chunk read back; the second time, every chunk


def test_a_selection_of_one_chunk_keeps_the_entry_it_had_before_chunks(tmp_path, monkeypatch):
    """Cached unedited results of earlier runs (one entry per whole selection) are still found."""
    import sadr.runner as runner

    monkeypatch.setattr(runner, "evaluate_all", lambda evaluators, model, tokenizer, adapter, cases: [{}] * len(cases))
    cases = _probe_cases(3)
    runner.unedited_results(SimpleNamespace(model=None, tokenizer=None, adapter=None), cases, [ProbeEvaluator()],
                            "w", str(tmp_path))
    whole = runner.cache_key(kind="unedited", model="w", cases=[repr(c) for c in cases],
                             evaluators=[{"name": "probe"}])
    assert [path.name for path in (tmp_path / "unedited").glob("*.json")] == [f"{whole}{runner.JSON.suffix}"]


def _leaves(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{path}[{index}]")
    else:
        yield path, node


def test_unedited_results_in_chunks_are_the_whole_selection_s_up_to_float_rounding(tiny_dir, tmp_path, monkeypatch):
    """8 offline records scored at once and in chunks of 3 on a tiny model: every decision the same, every probability
    within float32 rounding (a chunk's prompts share other batches)."""
    import sadr.runner as runner
    from tests.runs import OFFLINE_RECORDS, composed

    overrides = tiny_overrides(tiny_dir, tmp_path / "run", f"dataset.path={OFFLINE_RECORDS}", "dataset.limit=8")
    experiment = runner.Experiment(composed(overrides))
    score = lambda folder: runner.unedited_results(experiment.loaded, experiment.dataset.cases,  # noqa: E731
                                                   experiment.evaluators, "w", str(tmp_path / folder))
    whole = dict(_leaves(score("whole")))
    monkeypatch.setattr(runner, "UNEDITED_CHUNK", 3)
    chunked = dict(_leaves(score("chunked")))
    assert len(list((tmp_path / "chunked" / "unedited").glob("*.json"))) == 3
    assert chunked.keys() == whole.keys() and len(whole) > 100
    for path, value in whole.items():
        if isinstance(value, float):
            assert chunked[path] == pytest.approx(value, rel=1e-4, abs=1e-9), path
        else:
            assert chunked[path] == value, path
