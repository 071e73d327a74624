"""Registers the typed schema with Hydra and checks what types alone cannot."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import itertools
import logging
import math
import re
import typing
from importlib.resources.abc import Traversable
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from sadr.conf.schema import RunConfig, SadrConfig
from sadr.errors import InvalidSettingError

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
        for file in sorted(folder.iterdir(), key=lambda entry: entry.name):
            if not file.name.endswith(".yaml"):
                continue
            where = f"{group}/{file.name} of editor={editor} (in {config_dir})"
            model = file.name.removesuffix(".yaml").removeprefix(f"{editor}_")
            if model not in models:
                raise ConfigError(f"{where}: expected a name {editor}_<model>.yaml, <model> one of {', '.join(models)}")
            text = file.read_text(encoding="utf-8")
            # the header as Hydra reads it: the comment lines (blank ones between them) before the first value
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


class ConfigError(InvalidSettingError):
    pass


def validate_layers(editor: DictConfig, n_layers: int) -> None:
    """The editor's layers exist in the loaded model (checked once it is loaded, before anything is computed)."""
    outside = []
    if not all(0 <= layer < n_layers for layer in editor.layers):
        outside.append(f"editor.layers={list(editor.layers)}")
    if not 0 <= editor.v_loss_layer < n_layers:
        outside.append(f"editor.v_loss_layer={editor.v_loss_layer}")
    if outside:
        raise ConfigError(f"{' and '.join(outside)}: the model has layers 0..{n_layers - 1}; give layers in that "
                          f"range (the published ones for a model are in sadr/conf/hparams/)")


def unknown_keys(node: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the keys its node declares) for each key that is not in the node's schema.

    Hydra lets a `+key=value` override add a key that no dataclass declares; nothing reads it, so a misspelt
    `+sadr.lamda=0.1` would run with the default γ.
    """
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):  # a Dict or Any node (a plug-in's): its keys are the user's to choose
        return []
    declared = [f.name for f in dataclasses.fields(schema)]
    found = []
    for key in node.keys():
        if key == "hydra" and not prefix:  # Hydra's own node, in a config composed with it
            continue
        if key not in declared:
            found.append((f"{prefix}{key}", declared))
        elif not (OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key)) \
                and isinstance(node[key], DictConfig):
            found.extend(unknown_keys(node[key], f"{prefix}{key}."))
    return found


def _check_known_keys(cfg: DictConfig) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        key, declared = unknown[0]
        editor = cfg.editor.name if key.startswith("editor.") else None
        raise ConfigError(f"+{key}: " + no_such_setting(key, declared, editor, so=", so nothing would read it",
                                                        how=" (set without '+')"))


# Keys an earlier release read, and what replaced them (a command line or a sweep written for it names them).
RENAMED = {
    "eval.new_tokens": "eval.generation_length, which counts the prompt's tokens in the default "
                       "eval.generation_style=reference (eval.generation_style=fixed counts new tokens, as "
                       "eval.new_tokens did)",
}


def no_such_setting(key: str, declared: list[str], editor: str | None = None, so: str = "", how: str = "") -> str:
    """What to say of a dotted key that its node does not declare: what replaced it, the close setting, or, for a
    key of `editor`'s node, the editors that have it; then the node's settings. `so`: what follows from it; `how`:
    what to add to the suggested key."""
    from sadr.editors.registry import EDITORS

    parent, _, name = key.rpartition(".")
    node = parent or "the run config"
    owners = [other for other, plugin in EDITORS.items() if editor and name in _declared(plugin.config)]
    close = difflib.get_close_matches(name, declared, n=1)
    if key in RENAMED:
        hint = f"it is now {RENAMED[key]}; "
    elif owners:
        hint = f"it is a setting of editor={' and editor='.join(owners)}, not of editor={editor}; "
    else:
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}{how}? " if close else ""
    return f"{node} has no setting '{name}'{so}; {hint}{node}'s settings: {', '.join(declared)}"


def _declared(schema: type) -> dict[str, type]:
    """A dataclass's settings and their types."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def misspelt_override(overrides: list[str]) -> str | None:
    """For the first `key=value` override whose key no schema declares, what `no_such_setting` says of it; None if
    each is declared (or the editor is swept, so not one). Hydra stops at such a key with advice to add '+', which
    would add a key that nothing reads."""
    from sadr.editors.registry import EDITORS

    groups = {path.name for path in Path(__file__).parent.iterdir() if path.is_dir() and not path.name.startswith("_")}
    chosen = dict(o.partition("=")[::2] for o in overrides if o.startswith("editor="))
    editor = chosen.get("editor") or next(entry["editor"] for entry in OmegaConf.load(Path(__file__).parent / "config.yaml")
                                          .defaults if isinstance(entry, DictConfig) and "editor" in entry)
    nodes = {"sadr": SadrConfig, "editor": EDITORS[editor].config if editor in EDITORS else None}
    for override in overrides:
        key, given, _ = override.partition("=")
        if not given or key.startswith(("+", "~", "hydra.", "-")) or "/" in key or key in groups:  # -: Hydra's flags
            continue
        schema, parent = RunConfig, ""
        for name in key.split("."):
            declared = _declared(schema)
            if name not in declared:
                return f"{key}: {no_such_setting(key, list(declared), editor if parent == 'editor.' else None)}"
            schema = nodes.get(name, declared[name]) if not parent else declared[name]
            parent += f"{name}."
            if not dataclasses.is_dataclass(schema):  # a value, or a node whose keys are the user's (Any, Dict)
                break
    return None


# a choice whose settings come from one file per (editor, model): (the choice, the choice without such a file, the
# group of those files, what a missing file means, what to do instead); the files are in sadr/conf, or for the groups
# of SETTINGS_GROUPS in an installed editor's config_dir
PAIR_SETTINGS = (
    ("sadr=paper", "sadr=default", "sadr_hparams/paper", "no published SADR setting",
     "choose γ yourself with sadr.lambda=<γ> instead (and the δ steps with editor.v_num_grad_steps)"),
    ("setup=sadr_repo", "setup=published", "setup_hparams/sadr_repo", "no run of the SADR authors' code",
     "leave setup=sadr_repo out to take the published settings"),
)


def missing_pair_setting(overrides: list[str]) -> str | None:
    """With `sadr=paper` or `setup=sadr_repo` for an (editor, model) that has no file of its settings, what to do
    instead; None otherwise (or where the command line does not compose without those choices: Hydra's own message
    stands). Hydra's message for it lists the pairs that have one."""
    # the overrides alone: Hydra's flags (--cfg job, -m) compose nothing
    given = [override.lstrip("+") for override in overrides if "=" in override and not override.startswith("-")]
    chosen = [entry for entry in PAIR_SETTINGS if entry[0] in given]
    if not chosen:
        return None
    fallbacks = {choice: fallback for choice, fallback, *_ in PAIR_SETTINGS}
    try:
        cfg = compose_config([fallbacks.get(o, o) for o in given], checked=False, hydra=True)
    except Exception:  # noqa: BLE001 - any other reason not to compose is Hydra's to report
        return None
    editor, model = (cfg.hydra.runtime.choices[name] for name in ("editor", "model"))
    from sadr.editors.registry import EDITORS

    config_dir = EDITORS[editor].config_dir
    with sadr_configs():
        options = GlobalHydra.instance().config_loader().get_group_options
        missing = [f"{choice}: {what} for editor={editor} on model={model}; {instead}, or add the setting, with its "
                   f"source, as {group}/{editor}_{model}.yaml "
                   f"(in {config_dir if config_dir is not None and group in SETTINGS_GROUPS else 'sadr/conf'})"
                   for choice, _, group, what, instead in chosen if f"{editor}_{model}" not in options(group)]
    return "; and ".join(missing) or None


def validate_sadr(sadr: DictConfig) -> None:
    """The `sadr` node's values in their domains (the schema has checked their types)."""
    lam = sadr["lambda"]
    if not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"sadr.lambda={lam}: γ must be a finite number >= 0 (0 turns SADR off)")
    if not math.isfinite(sadr.epsilon) or sadr.epsilon <= 0:
        raise ConfigError(f"sadr.epsilon={sadr.epsilon}: must be a finite number > 0 (added to both distributions)")
    if sadr.layers is not None and (not sadr.layers or min(sadr.layers) < 0):
        raise ConfigError(f"sadr.layers={list(sadr.layers)}: give null (every layer after the edited one) or layer "
                          "indices >= 0")


# (key, whether 0 is allowed) of the editors' weights; each is checked where the editor's config has it. MEMIT's and
# PMET's solve divides by mom2_update_weight (λ of λC + K Kᵀ), so it must be above 0.
EDITOR_WEIGHTS = (("v_lr", False), ("clamp_norm_factor", False), ("v_weight_decay", True), ("kl_factor", True),
                  ("mom2_update_weight", False), ("nullspace_threshold", False), ("L2", True), ("nll_loss_factor", False))


def _check_delta_weights(editor: DictConfig) -> None:
    """The editor's numbers in their domains: a learning rate, norm bound, null-space threshold or target loss weight
    of 0 makes no edit, a negative one fails inside torch with a traceback or makes no edit, and NaN spreads."""
    for key, zero_allowed in EDITOR_WEIGHTS:
        if key not in editor:
            continue
        value = editor[key]
        if not math.isfinite(value) or value < 0 or value == 0 and not zero_allowed:
            raise ConfigError(f"editor.{key}={value}: must be a finite number {'>=' if zero_allowed else '>'} 0")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate(cfg: DictConfig) -> None:
    """Cross-field checks, each naming the key and what it accepts."""
    _check_known_keys(cfg)
    validate_sadr(cfg.sadr)
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads}: must be >= 1 (null: torch's default)")
    if cfg.eval.batch_size < 1:  # a batch of 0 pairs ended in a traceback in the scorer
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size}: must be >= 1")
    from sadr.evaluation.probes import resolve_metrics

    resolve_metrics(list(cfg.eval.metrics))  # a misspelt name, before a sweep's jobs start or a run claims its folder
    from sadr.data.selection import Selection

    Selection.from_config(cfg.dataset)  # a bad dataset.limit, shard or case_ids, before a sweep's jobs start, too
    if not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device={cfg.device}: expected auto, cpu, cuda, cuda:N (N a GPU's index) or mps")
    if OmegaConf.is_missing(cfg.model, "source"):
        raise ConfigError(f"model={cfg.model.name} needs model.source: a local model folder, a GGUF file or a hub id "
                          "(model.source=PATH)")
    from sadr.models.loading import check_local_source

    check_local_source(cfg.model.source)  # before the editor's layers, which a mistyped folder would ask for first
    editor = cfg.editor
    from sadr.editors.registry import EDITORS

    plugin = EDITORS.get(editor.name)
    if plugin is None or OmegaConf.get_type(editor) is not plugin.config:
        raise ConfigError(f"editor.name={editor.name} does not match the editor config; choose the editor with "
                          f"editor=<name> (one of {', '.join(EDITORS)}) and leave editor.name alone")
    missing = [key for key in ("layers", "v_loss_layer") if OmegaConf.is_missing(editor, key)]
    if missing:
        raise ConfigError(
            f"no published defaults for editor={editor.name} with model={cfg.model.name} "
            f"({plugin.config_dir or 'sadr/conf'}/hparams/{editor.name}_{cfg.model.name}.yaml does not exist): set "
            + " and ".join(f"editor.{key}=..." for key in missing)
            + ", e.g. editor.layers=[5] editor.v_loss_layer=<last layer index>"
        )
    if not editor.layers:
        raise ConfigError("editor.layers is empty; give the layer(s) to edit, e.g. editor.layers=[5]")
    if editor.v_loss_layer < max(editor.layers):
        raise ConfigError(
            f"editor.v_loss_layer={editor.v_loss_layer} is below the edited layer {max(editor.layers)}: δ could not "
            "reach the loss. The loss is read at the model's last layer (editor.v_loss_layer=<number of layers - 1>), "
            "and the edited layers lie below it. If editor.layers names a layer the model does not have "
            f"(editor.layers={list(editor.layers)}), give layers below the model's last one instead"
        )
    if editor.v_num_grad_steps < 1:
        raise ConfigError(f"editor.v_num_grad_steps={editor.v_num_grad_steps}: must be >= 1")
    _check_delta_weights(editor)
    if editor.batch_size < 1:
        raise ConfigError(f"editor.batch_size={editor.batch_size}: must be >= 1")
    if editor.protocol.name == "single" and editor.batch_size != 1:
        raise ConfigError(
            f"editor.batch_size={editor.batch_size} with editor.protocol=single; use editor.protocol=batch "
            "(or sequential) to edit several requests at once"
        )
    parallel = editor.parallel_cases
    if parallel is not None and parallel < 1:
        raise ConfigError(f"editor.parallel_cases={parallel}: must be >= 1 (1: one case at a time; null: by device)")
    if parallel is not None and parallel > 1 and editor.protocol.name != "single":
        raise ConfigError(
            f"editor.parallel_cases={parallel} with editor.protocol={editor.protocol.name}: cases run side by "
            "side only in the single protocol, where each edits the unedited model; set editor.parallel_cases=1"
        )
    if parallel is not None and parallel > 1 and cfg.save_edited:
        raise ConfigError(
            f"save_edited=true with editor.parallel_cases={editor.parallel_cases}: parallel cases are evaluated without "
            "writing their weights, so there is no edited model to save; set editor.parallel_cases=1"
        )
    for pair in editor.context_templates:
        if len(pair) != 2 or min(pair) < 0:
            raise ConfigError(f"editor.context_templates entry {list(pair)}: expected [max_tokens, count]")
    from sadr.models.adapters import ADAPTERS

    family = cfg.model.family
    if family is not None and family not in ADAPTERS:
        raise ConfigError(f"model.family={family}: not a supported family (config.model_type); supported: "
                          f"{', '.join(sorted(ADAPTERS))}, or null to take the model's own")
