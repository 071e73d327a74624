"""The folder of the sweep a `sadr-run -m` process launched, for the line it prints when Ctrl-C stops it.

A launcher that runs each job in a process of its own (hydra/launcher=local, gpus, slurm) keeps no job config in
the launching process, and a sweep folder named by the time (`${now:...}`) can only be read from the config that the
sweep started with: this Hydra callback (config.yaml, `hydra.callbacks.sweep_folder`) keeps it.
"""
from __future__ import annotations

from hydra.experimental.callback import Callback


class SweepFolder(Callback):
    started: str | None = None  # the sweep folder of the multirun this process launched

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepFolder.started = str(config.hydra.sweep.dir)
