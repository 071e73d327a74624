"""The folder of the sweep a `sadr-run -m` process launched, for the line it prints when Ctrl-C stops it.

A launcher that runs each job in a process of its own (hydra/launcher=local, gpus, slurm) keeps no job config in
the launching process, and a sweep folder named by the time (`${now:...}`) can only be read from the config that the
sweep started with: this Hydra callback (config.yaml, `hydra.callbacks.sweep_folder`) keeps it. At the sweep's end
it also removes the empty folder that submitit makes of its folder pattern itself (`.submitit/%j`), as
`sadr-run` does when Ctrl-C stops the sweep.

Before any job starts, it also checks that the sweep has one folder: a folder named after a key the sweep varies
(`experiment=sadr_comparison model=gpt-j,llama3-8b`, whose folder is `.../${model.name}_${dataset.name}/...`) would
be one folder per value for the jobs, and for the launching process, whose config has none of the swept values, a
third one, where the sweep's tables would find no run.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

# `${model.name}` in a folder's pattern; not a resolver's call, such as `${now:%H-%M-%S}`
REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.-]*)\}")
# the group whose options set the sweep's folder themselves (sadr/conf/experiment/*.yaml), unless the command line does
FOLDER_SETTING_GROUP = "experiment"


class SweepFolder(Callback):
    started: str | None = None  # the sweep folder of the multirun this process launched
    job_pattern: str | None = None  # submitit's folder pattern of its jobs (`hydra.launcher.submitit_folder`), if any

    def on_multirun_start(self, config, **kwargs) -> None:
        problem = folder_varied_by_the_sweep(config)
        if problem:  # SystemExit passes Hydra's report of errors, which would add a traceback; exit status 2
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        SweepFolder.started = str(config.hydra.sweep.dir)
        pattern = OmegaConf.select(config, "hydra.launcher.submitit_folder")
        SweepFolder.job_pattern = str(pattern) if pattern else None

    def on_multirun_end(self, config, **kwargs) -> None:
        SweepFolder.remove_empty_pattern_folder()

    @staticmethod
    def remove_empty_pattern_folder() -> None:
        """Remove the folder submitit names after its pattern itself (`.submitit/%j`), left empty, at a sweep's end or
        when Ctrl-C stops it."""
        if SweepFolder.job_pattern and "%j" in SweepFolder.job_pattern:
            folder = Path(SweepFolder.job_pattern)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def folder_varied_by_the_sweep(config) -> str | None:
    """What is wrong when the sweep folder's pattern refers to a key the sweep varies, or None."""
    pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
    referred = set(REFERENCE.findall(str(pattern)))
    params = OmegaConf.select(config, "hydra.sweeper.params")
    params = OmegaConf.to_container(params) if params is not None else {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    folder_given = any(line.split("=", 1)[0].lstrip("+") == "hydra.sweep.dir" for line in config.hydra.overrides.hydra)
    swept = {}
    for override in OverridesParser.create().parse_overrides(lines):  # the command line's replaces the config's
        swept[override.key_or_group] = override if override.is_sweep_override() else None
    for key, override in swept.items():
        if override is None:
            continue
        names = [path for path in referred if path == key or path.startswith(f"{key}.") or key.startswith(f"{path}.")]
        if names or (key == FOLDER_SETTING_GROUP and not folder_given):
            named_after = f"named after {', '.join(sorted(names))}" if names else f"set by each {key}"
            return (f"this sweep varies {key} ({override.input_line}), and its folder, hydra.sweep.dir={pattern}, is "
                    f"{named_after}: each value's jobs would write into a folder of their own, and the sweep's tables "
                    f"into one that holds none of them. Run one sweep per value, or give the sweep one folder "
                    f"(hydra.sweep.dir=<folder>)")
    return None
