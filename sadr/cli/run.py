"""`sadr-run`: compose the Hydra config and run one experiment (or a sweep with -m)."""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from sadr.conf.registry import register_configs, validate
from sadr.runner import run_experiment

log = logging.getLogger("sadr")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    validate(cfg)
    run_experiment(cfg)


def main() -> None:
    register_configs()
    _main()


if __name__ == "__main__":
    main()
