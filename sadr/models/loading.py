"""Load a model and tokenizer from a hub id, a local directory, a GGUF file, or the embedded default."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sadr.errors import DamagedFileError, InvalidSettingError, MissingInputError, UnavailableError, UsageError
from sadr.models.adapters import ModelAdapter, adapter_for_config
from sadr.models.devices import resolve_device
from sadr.models.embedded import EMBEDDED_SOURCES, embedded_gguf
from sadr.models.gguf import unpacked_gguf
from sadr.models.tokenization import pad_id_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    resolved_source: str  # the file, directory or hub id actually loaded

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _from_pretrained_args(source: str, gguf_file: str | None, revision: str | None, dtype: str,
                          cache_dir: str) -> tuple[str, str]:
    """(where `from_pretrained` loads from, what results name as the source). A GGUF file, local or
    fetched from a hub repository into the hub's cache, is loaded from its unpacked folder (sadr/models/gguf.py)."""
    if source in EMBEDDED_SOURCES:
        return _unpacked(embedded_gguf(source, cache_dir), dtype, cache_dir)
    check_local_source(source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return _unpacked(path, dtype, cache_dir)
    if gguf_file:
        if (path / gguf_file).is_file():
            return _unpacked(path / gguf_file, dtype, cache_dir)
        if path.is_dir():
            raise MissingInputError(f"{path} holds no file {gguf_file} (model.gguf_file)")
        return _unpacked(_hub_file(source, gguf_file, revision), dtype, cache_dir, named=f"{source}/{gguf_file}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise MissingInputError(
            f"model directory {path} has no config.json, so it is not a saved model (model.source): give a folder "
            "written by save_pretrained (config.json, weights and tokenizer files), a .gguf file, or a hub id")
    location = str(path) if path.exists() else source
    return location, location


def check_local_source(source: str) -> None:
    """A model.source that can only be a path (a .gguf file; a folder starting with '.', '/' or '~', or with more
    than one '/', which a hub id never has) exists; any other source may be a hub id, which only loading can check."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise MissingInputError(f"GGUF file {path} does not exist (model.source)")
    if (source.startswith((".", "/", "~")) or source.count("/") > 1) and not path.exists():
        raise MissingInputError(f"model directory {path} does not exist (model.source)")


def _unpacked(gguf: Path, dtype: str, cache_dir: str, named: str | None = None) -> tuple[str, str]:
    return str(unpacked_gguf(gguf, DTYPES[dtype], cache_dir)), named or str(gguf)


def _hub_file(repo: str, filename: str, revision: str | None) -> Path:
    """The file of a hub repository, downloaded into the Hugging Face cache once (or found there offline)."""
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except ValueError as err:  # not a repository id
        raise InvalidSettingError(f"model.source={repo!r} is neither a local folder nor a hub repository id "
                                  f"({str(err).splitlines()[0]})") from err
    except OSError as err:
        raise UnavailableError(
            f"could not fetch {filename!r} of {repo!r} from the Hugging Face hub ({str(err).splitlines()[0]}). "
            f"Without network access, download it elsewhere and set model.source=/path/to/{filename}") from err


def _load_tokenizer(location: str, extra: dict):
    """The tokenizer of a model folder (or hub id, or GGUF file), refused when it cannot encode text: transformers
    builds an empty one (no tokens for any text) for a folder without tokenizer files, or fails on a ValueError."""
    fix = "Save the model's tokenizer into that folder too (tokenizer.save_pretrained(folder))"
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    except ValueError as err:
        if "tokenizer" not in str(err):
            raise
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise MissingInputError(f"no usable tokenizer in {location} (model.source): {message} {fix}, as a "
                                "tokenizer.json, or install what the message names.") from err
    text = "The capital of France is"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not plain:
        raise MissingInputError(f"the tokenizer loaded from {location} (model.source) encodes text as no tokens (its "
                                f"vocabulary has {len(tokenizer)} entries): are its tokenizer files missing? {fix}.")
    full = tokenizer(text)["input_ids"]
    if full[-len(plain):] != plain:
        # a prompt's ids must end with its last word: its continuation (a target, a generated text) is read after them
        appended = tokenizer.convert_ids_to_tokens(full[-1])
        raise InvalidSettingError(
            f"the tokenizer loaded from {location} (model.source) appends {appended!r} "
            "to every text it encodes, so each prompt would end with it, and every target and generated text would "
            "follow it. Save it without that token: AutoTokenizer.from_pretrained(folder, add_eos_token=False, "
            "add_bos_token=...).save_pretrained(folder), with add_bos_token as the model needs it (True for Llama).")
    return tokenizer


def load_model(source: str, *, cache_dir: str, gguf_file: str | None = None, revision: str | None = None,
               family: str | None = None, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """`cache_dir`: where the embedded model's file is fetched, a GGUF file unpacked, and GPUs assigned to jobs."""
    # before a download or a GGUF unpacking: a device this machine lacks fails at once
    target = torch.device(resolve_device(device, Path(cache_dir) / "gpus"))
    location, resolved = _from_pretrained_args(source, gguf_file, revision, dtype, cache_dir)
    extra = {"revision": revision} if revision else {}
    log.info("loading model %s %s", location, extra)
    placement = {}
    if target.type == "cuda":  # straight onto the GPU: a 20B model never passes through host memory whole
        placement = {"device_map": {"": target.index if target.index is not None else torch.cuda.current_device()}}
    try:
        config = AutoConfig.from_pretrained(location, **extra)
        # before the tokenizer and the weights: a model that cannot be edited is named as such, and costs no load
        adapter = _supported(config, family, source)
        tokenizer = _load_tokenizer(location, extra)
        model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=DTYPES[dtype], **placement, **extra)
    except SafetensorError as err:  # a weights file cut short (a copy that did not finish) or overwritten
        if location != resolved:
            fix = f"delete that folder, unpacked from {resolved}, and the next run unpacks it again"
        elif Path(location).exists():
            fix = "copy or save the model again"
        else:
            fix = "delete the model from the Hugging Face cache (`hf cache`), and the next run downloads it again"
        raise DamagedFileError(f"the weights in {location} (model.source) cannot be read ({err}): a file is damaged; "
                               f"{fix}") from err
    except UsageError:  # the tokenizer's own message, which names the fix
        raise
    except OSError as err:
        if Path(location).exists():  # e.g. a folder with its config and tokenizer but no weights
            raise MissingInputError(
                f"could not load the model in {location} (model.source): {str(err).strip()} Give a folder written by "
                "save_pretrained (config.json, weights and tokenizer files), a .gguf file, or a hub id") from err
        raise UnavailableError(
            f"could not load {location!r} from the Hugging Face hub ({' '.join(str(err).split())}). Without network "
            "access, download the model elsewhere and set model.source=/path/to/model_dir (or a .gguf file), which keeps "
            "the model's published settings; HF_HUB_OFFLINE=1 makes a missing hub model fail at once instead of after "
            "retries."
        ) from err
    pad_id_of(tokenizer)  # sets a pad token on tokenizers that have none
    model = model.to(target).eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, adapter, resolved)


def _supported(config, family: str | None, source: str) -> ModelAdapter:
    """The adapter of the model's family, refused when it is unsupported or is not the configured `model.family`."""
    adapter = adapter_for_config(config)
    if family is not None and adapter.family != family:
        raise InvalidSettingError(
            f"model.family is {family!r} but {source} is a {adapter.family!r} model (config.model_type); "
            "fix model.family or model.source"
        )
    return adapter
