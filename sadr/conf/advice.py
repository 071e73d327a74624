"""What to do instead, for a command line that Hydra refuses to compose: Hydra's own message for a misspelt key
advises '+', which would add a key that nothing reads, and for a missing (editor, model) settings file lists the pairs
that have one."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from sadr.conf.registry import SETTINGS_GROUPS, compose_config, sadr_configs
from sadr.conf.schema import RunConfig, SadrConfig
from sadr.conf.validation import declared_settings, no_such_setting


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
            declared = declared_settings(schema)
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
