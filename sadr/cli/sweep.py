"""The folder of the sweep a `sadr-run -m` process launched, for the line it prints when Ctrl-C stops it.

A launcher that runs each job in a process of its own (hydra/launcher=local, gpus, slurm) keeps no job config in
the launching process, and a sweep folder named by the time (`${now:...}`) can only be read from the config that the
sweep started with: this Hydra callback (config.yaml, `hydra.callbacks.sweep_folder`) keeps it. At the sweep's end
it also removes the empty folder that submitit makes of its folder pattern itself (`.submitit/%j`).
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


class SweepFolder(Callback):
    started: str | None = None  # the sweep folder of the multirun this process launched

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepFolder.started = str(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        pattern = OmegaConf.select(config, "hydra.launcher.submitit_folder")
        if pattern and "%j" in str(pattern):
            folder = Path(pattern)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
