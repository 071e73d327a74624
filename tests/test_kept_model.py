"""Jobs run one after another in one process load a model once, and never get one whose weights changed."""
import os
import shutil
import weakref

import torch

from sadr.models import kept
from sadr.models.fingerprint import model_fingerprint
from tests.tiny_models import make_model, make_tokenizer


def _counting_loads(monkeypatch) -> list[tuple]:
    calls = []
    real = kept.load_model

    def load_model(source, **options):
        calls.append((source, options.get("dtype")))
        return real(source, **options)

    monkeypatch.setattr(kept, "load_model", load_model)
    return calls


def test_the_same_request_reuses_the_kept_model_while_its_weights_are_unchanged(tmp_path, monkeypatch):
    make_model("llama").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    calls = _counting_loads(monkeypatch)
    kept.release_kept_model()
    first, fingerprint = kept.load_model_kept(str(tmp_path), device="cpu", cache_dir=str(tmp_path), dtype="float32")
    again, same = kept.load_model_kept(str(tmp_path), device="cpu", cache_dir=str(tmp_path), dtype="float32")
    assert again is first and same == fingerprint and len(calls) == 1

    with torch.no_grad():
        first.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # a job that did not restore its edit
    fresh, reloaded = kept.load_model_kept(str(tmp_path), device="cpu", cache_dir=str(tmp_path), dtype="float32")
    assert fresh is not first and reloaded == fingerprint == model_fingerprint(fresh.model) and len(calls) == 2

    half, _ = kept.load_model_kept(str(tmp_path), device="cpu", cache_dir=str(tmp_path), dtype="bfloat16")
    assert half is not fresh and half.model.dtype == torch.bfloat16 and len(calls) == 3

    make_model("llama", seed=1).save_pretrained(tmp_path)  # the files changed on disk
    rewritten, other = kept.load_model_kept(str(tmp_path), device="cpu", cache_dir=str(tmp_path), dtype="bfloat16")
    assert rewritten is not half and other != fingerprint and len(calls) == 4
    kept.release_kept_model()


def test_asking_for_another_model_drops_the_kept_one_before_loading_it(tmp_path, monkeypatch):
    """Two models never hold memory at once: by the time the second loads, nothing holds the first."""
    for family in ("llama", "gpt2"):
        make_model(family).save_pretrained(tmp_path / family)
        make_tokenizer().save_pretrained(tmp_path / family)
    kept.release_kept_model()
    first, _ = kept.load_model_kept(str(tmp_path / "llama"), device="cpu", cache_dir=str(tmp_path))
    first_model = weakref.ref(first.model)
    del first
    real, first_alive = kept.load_model, []
    monkeypatch.setattr(kept, "load_model", lambda source, **options: first_alive.append(first_model() is not None)
                        or real(source, **options))
    second, _ = kept.load_model_kept(str(tmp_path / "gpt2"), device="cpu", cache_dir=str(tmp_path))
    assert first_alive == [False] and second.adapter.family == "gpt2"
    kept.release_kept_model()


def test_a_weights_file_replaced_on_disk_is_loaded_again(tmp_path):
    """Only the weights file was replaced (a new file renamed over it, so the kept model's weights are untouched and
    still match its fingerprint), after the tokenizer's files were written: the folder's newest time tells it."""
    make_model("llama").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    make_model("llama", seed=1).save_pretrained(tmp_path / "other")
    kept.release_kept_model()
    first, fingerprint = kept.load_model_kept(str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path))
    shutil.copy(tmp_path / "other" / "model.safetensors", tmp_path / "model" / "new.safetensors")
    os.replace(tmp_path / "model" / "new.safetensors", tmp_path / "model" / "model.safetensors")
    again, other = kept.load_model_kept(str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path))
    assert again is not first and other != fingerprint == model_fingerprint(first.model)
    kept.release_kept_model()


def test_a_weights_file_copied_in_with_its_old_time_is_loaded_again(tmp_path):
    """`cp -p` or `rsync -t` keeps the modification time of the file it brings: the new file (another inode, a later
    status change) is still seen, so the kept model's old weights are not reused."""
    make_model("llama").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    make_model("llama", seed=1).save_pretrained(tmp_path / "other")
    weights = tmp_path / "model" / "model.safetensors"
    kept.release_kept_model()
    first, fingerprint = kept.load_model_kept(str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path))
    old_times = weights.stat()
    shutil.copy(tmp_path / "other" / "model.safetensors", tmp_path / "model" / "new.safetensors")
    os.utime(tmp_path / "model" / "new.safetensors", ns=(old_times.st_atime_ns, old_times.st_mtime_ns))
    os.replace(tmp_path / "model" / "new.safetensors", weights)
    assert weights.stat().st_mtime_ns == old_times.st_mtime_ns
    again, other = kept.load_model_kept(str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path))
    assert again is not first and other != fingerprint
    kept.release_kept_model()


def test_weights_overwritten_in_place_with_their_old_time_kept_are_loaded_again(tmp_path, monkeypatch):
    """`cp -p` onto the kept model's file: same inode, same size, the old modification time put back; only the
    status-change time says the file changed, and the next job must load the new weights. (In bfloat16 the kept
    weights are a copy, not a view of the file that the write would change too, as they would be on a GPU.)"""
    make_model("llama").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    other = make_model("llama")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(1.0)
    other.save_pretrained(tmp_path / "other")
    weights, new = tmp_path / "model" / "model.safetensors", (tmp_path / "other" / "model.safetensors").read_bytes()
    assert len(new) == weights.stat().st_size
    calls = _counting_loads(monkeypatch)
    kept.release_kept_model()
    first, fingerprint = kept.load_model_kept(str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path),
                                              dtype="bfloat16")
    old = weights.stat()
    with open(weights, "r+b") as file:  # written in place: the inode stays
        file.write(new)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (old.st_ino, old.st_mtime_ns)
    again, changed = kept.load_model_kept(str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path),
                                          dtype="bfloat16")
    assert again is not first and len(calls) == 2 and changed != fingerprint
    assert torch.equal(again.model.model.layers[1].mlp.down_proj.weight, other.model.layers[1].mlp.down_proj.weight.bfloat16())
    kept.release_kept_model()
