"""Jobs run one after another in one process load a model once, and never get one whose weights changed."""
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
