"""`tf32=true`: float32 products in TensorFloat-32 on CUDA, set by each run, and caches keyed apart from float32 ones."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from sadr import runner
from sadr.models.devices import set_tf32, tf32_in_use
from sadr.models.fingerprint import computation_fingerprint
from sadr.runner import Experiment
from tests.runs import composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)


@pytest.fixture
def cuda_products():
    """Restore the process-wide CUDA float32 product setting after a test."""
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def test_tf32_is_set_and_cleared_on_cuda_only(cuda_products, caplog):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert set_tf32(cuda, True) and tf32_in_use(cuda) and not tf32_in_use(cpu)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert not set_tf32(cuda, False) and not tf32_in_use(cuda)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    with caplog.at_level(logging.WARNING):
        assert not set_tf32(cpu, True)
    assert "no effect on cpu" in caplog.text and torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_caches_key_the_weights_tokenizer_tf32_and_gpu_computations_apart():
    keys = {computation_fingerprint(weights, tokenizer, tf32, device) for weights in ("abc", "abd")
            for tokenizer in ("t1", "t2") for tf32 in (False, True) for device in ("cpu", "cuda")}
    assert len(keys) == 16
    assert computation_fingerprint("abc", "t1", False) == computation_fingerprint("abc", "t1", False, "cpu")


def test_a_run_on_the_cpu_ignores_tf32_and_records_it(tiny_dir, tmp_path, cuda_products):
    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "tf32=true")))
    assert not experiment.tf32
    assert experiment.computed_by == computation_fingerprint(experiment.fingerprint, experiment.tokenizer_fingerprint,
                                                             False)
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["tf32"] is False


def test_a_tf32_run_keys_its_statistics_apart(tiny_dir, tmp_path, monkeypatch, cuda_products):
    monkeypatch.setattr(runner, "set_tf32", lambda device, enabled: enabled)  # as on a CUDA device
    experiment = Experiment(composed(tiny_overrides(tiny_dir, tmp_path / "run", "tf32=true")))
    assert experiment.statistics.fingerprint == computation_fingerprint(experiment.fingerprint,
                                                                        experiment.tokenizer_fingerprint, True)
    assert experiment.statistics.fingerprint != computation_fingerprint(experiment.fingerprint,
                                                                        experiment.tokenizer_fingerprint, False)
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["tf32"] is True and environment["model_fingerprint"] == experiment.fingerprint
