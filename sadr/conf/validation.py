"""Checks of a composed config that its types alone cannot make, each naming the key and what it accepts."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from sadr.errors import InvalidSettingError


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
    owners = [other for other, plugin in EDITORS.items() if editor and name in declared_settings(plugin.config)]
    close = difflib.get_close_matches(name, declared, n=1)
    if key in RENAMED:
        hint = f"it is now {RENAMED[key]}; "
    elif owners:
        hint = f"it is a setting of editor={' and editor='.join(owners)}, not of editor={editor}; "
    else:
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}{how}? " if close else ""
    return f"{node} has no setting '{name}'{so}; {hint}{node}'s settings: {', '.join(declared)}"


def declared_settings(schema: type) -> dict[str, type]:
    """A dataclass's settings and their types."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


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


# `cache_dir`'s default. OmegaConf resolves oc.env's default before it reads the variable, so HOME's own default ""
# lets SADR_CACHE_DIR alone set it; with neither set, `resolved_cache_dir` refuses the "/.cache/sadr" it resolves to.
CACHE_DIR = '${oc.env:SADR_CACHE_DIR,${oc.env:HOME,""}/.cache/sadr}'


def resolved_cache_dir(cfg: DictConfig) -> str:
    """`cfg.cache_dir`; its default with neither SADR_CACHE_DIR nor HOME set (a bare container, a service), or a
    given value that does not resolve, is a ConfigError that says what to set, not OmegaConf's traceback."""
    given = OmegaConf.to_container(cfg, resolve=False)["cache_dir"]
    if given == CACHE_DIR and not os.environ.get("SADR_CACHE_DIR") and not os.environ.get("HOME"):
        raise ConfigError("cache_dir: its default is $SADR_CACHE_DIR, else $HOME/.cache/sadr, and neither variable is "
                          "set; set one, or give cache_dir=PATH")
    try:
        return cfg.cache_dir
    except InterpolationResolutionError as error:
        raise ConfigError(f"cache_dir={given}: {str(error).splitlines()[0]}; give cache_dir=PATH") from None


def validate(cfg: DictConfig) -> None:
    """Cross-field checks, each naming the key and what it accepts."""
    _check_known_keys(cfg)
    resolved_cache_dir(cfg)
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
