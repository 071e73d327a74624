"""Registers the typed schema and the editors' settings files with Hydra, and composes configs as `sadr-run` does."""
from __future__ import annotations

import contextlib
import io
import itertools
import logging
import re
from importlib.resources.abc import Traversable
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from sadr.conf.schema import RunConfig
from sadr.conf.validation import ConfigError, validate

log = logging.getLogger(__name__)


def register_configs() -> None:
    """The run's schema, one typed node per editor in the `editor` group, and the settings files of the editors that
    installed distributions declare, from the editors' declarations."""
    from sadr.editors.registry import EDITORS

    if not OmegaConf.has_resolver("sadr.cuda_count"):  # hydra/launcher=gpus: one worker per visible GPU
        OmegaConf.register_new_resolver("sadr.cuda_count", gpu_workers)
    store = ConfigStore.instance()
    store.store(name="base_config", node=RunConfig)
    for name, plugin in EDITORS.items():
        store.store(group="editor", name=name, node=plugin.config)
        if plugin.config_dir is not None:
            _store_settings_files(store, name, plugin.config_dir)


# The groups whose files an installed editor ships in its EditorPlugin.config_dir, and the package each one's files
# have in sadr/conf (their `# @package` header).
SETTINGS_GROUPS = {"hparams": "editor", "sadr_hparams/paper": "_global_"}


# What a sadr=paper file may set: a γ > 0 run is paired with its γ = 0 run (sadr summarize, report) only where the
# two differ in SADR settings and δ steps alone, so a file that set another key would leave the SADR arm unpaired, or
# change what it compares.
PAPER_KEYS = {"sadr": {"lambda"}, "editor": {"v_num_grad_steps"}}


def _paper_keys_beyond(node: DictConfig) -> list[str]:
    """The keys a sadr=paper file's `node` sets besides PAPER_KEYS."""
    beyond = []
    for top, value in node.items():
        if top not in PAPER_KEYS or not isinstance(value, DictConfig):
            beyond.append(str(top))
        else:
            beyond += [f"{top}.{key}" for key in value if key not in PAPER_KEYS[top]]
    return beyond


def _store_settings_files(store: ConfigStore, editor: str, config_dir: Traversable) -> None:
    """An installed editor's `<editor>_<model>.yaml` files, as if they were in sadr/conf (Hydra finds both)."""
    models = sorted(file.name.removesuffix(".yaml") for file in (Path(__file__).parent / "model").glob("*.yaml"))
    if not config_dir.is_dir():  # e.g. a wheel built without its YAML files as package data
        raise ConfigError(f"editor={editor} names the config_dir {config_dir}, which is not a folder: ship its "
                          "settings files with the package (as package data) or give the folder that holds them")
    for group, package in SETTINGS_GROUPS.items():
        folder = config_dir.joinpath(*group.split("/"))
        if not folder.is_dir():
            continue
        files = sorted(folder.iterdir(), key=lambda entry: entry.name)
        for file in files:
            where = f"{group}/{file.name} of editor={editor} (in {config_dir})"
            stem, _, extension = file.name.rpartition(".")
            if extension.lower() in ("yml", "yaml") and extension != "yaml":  # Hydra reads .yaml files only
                beside = any(other.name == f"{stem}.yaml" for other in files)  # by name: a file system may ignore case
                fix = f"{stem}.yaml beside it is the one read: remove this one" if beside else f"rename it {stem}.yaml"
                raise ConfigError(f"{where}: settings files end in .yaml; {fix}")
            if not file.name.endswith(".yaml"):
                continue
            model = file.name.removesuffix(".yaml").removeprefix(f"{editor}_")
            if model not in models:
                raise ConfigError(f"{where}: expected a name {editor}_<model>.yaml, <model> one of {', '.join(models)}")
            text = file.read_text(encoding="utf-8")
            # a package header anywhere in the comment lines before the first value (Hydra reads only the `# @`
            # lines that open a file; the file is stored under its group's package whatever it says, so a header
            # naming another package is refused rather than ignored)
            comments = itertools.takewhile(lambda line: not line or line.startswith("#"),
                                           (line.strip() for line in text.splitlines()))
            header = next(filter(None, (re.fullmatch(r"#\s*@package\s+(\S+)", line) for line in comments)), None)
            if header and header.group(1) != package:
                raise ConfigError(f"{where} has the header '# @package {header.group(1)}'; the files of {group} have "
                                  f"'# @package {package}'")
            try:
                node = OmegaConf.load(io.StringIO(text))
            except yaml.YAMLError as err:
                raise ConfigError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from err
            if not isinstance(node, DictConfig):
                raise ConfigError(f"{where} holds {type(node).__name__}; expected keys and values, as the files of "
                                  f"sadr/conf/{group} have")
            beyond = _paper_keys_beyond(node) if group == "sadr_hparams/paper" else []
            if beyond:
                raise ConfigError(f"{where} sets {', '.join(beyond)}: a sadr=paper file sets sadr.lambda and "
                                  "editor.v_num_grad_steps only (its runs are compared with the γ = 0 runs of the "
                                  f"same settings); put other settings in hparams/{file.name}")
            store.store(group=group, name=f"{editor}_{model}", node=node, package=package)


def gpu_workers() -> int:
    """hydra/launcher=gpus: one worker per visible GPU, or one, on the CPU, where there is none (said in a warning)."""
    count = torch.cuda.device_count()
    if count == 0:
        log.warning("hydra/launcher=gpus: no GPU is visible, so the jobs run one at a time on the CPU")
    return max(1, count)


def sadr_configs():
    """A context in which Hydra composes sadr's configs: Hydra initialised with them, or as `sadr-run` initialised it
    (a sweep's checks run within it)."""
    if GlobalHydra.instance().is_initialized():
        return contextlib.nullcontext()
    return initialize_config_module(config_module="sadr.conf", version_base="1.3")


def compose_config(overrides: list[str], *, checked: bool = True, hydra: bool = False) -> DictConfig:
    """The config `sadr-run <overrides>` composes, for scripts, benchmarks and tests; `checked`: as a run checks it
    (`validate`); `hydra`: with the `hydra` node."""
    register_configs()
    with sadr_configs():
        cfg = compose("config", overrides=overrides, return_hydra_config=hydra)
    if checked:
        validate(cfg)
    return cfg
