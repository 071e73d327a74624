"""The folder of the sweep a `sadr-run -m` process launched, for the line it prints when Ctrl-C stops it.

A launcher that runs each job in a process of its own (hydra/launcher=local, gpus, slurm) keeps no job config in
the launching process, and a sweep folder named by the time (`${now:...}`) can only be read from the config that the
sweep started with: this Hydra callback (config.yaml, `hydra.callbacks.sweep_folder`) keeps it. At the sweep's end
it also removes the empty folder that submitit makes of its folder pattern itself (`.submitit/%j`), as
`sadr-run` does when Ctrl-C stops the sweep.
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


class SweepFolder(Callback):
    started: str | None = None  # the sweep folder of the multirun this process launched
    job_pattern: str | None = None  # submitit's folder pattern of its jobs (`hydra.launcher.submitit_folder`), if any

    def on_multirun_start(self, config, **kwargs) -> None:
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
