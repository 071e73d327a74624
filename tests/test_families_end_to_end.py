"""Every family through the real `sadr-run` command: a tiny model saved as a local folder, a tokenizer without a pad
token, statistics from text the model generates (the default corpus), SADR on (γ > 0) and drift diagnostics on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from transformers import AutoTokenizer

from tests.runs import FIXTURE
from tests.tiny_models import FAMILIES, make_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(pad=False).save_pretrained(root)
    assert AutoTokenizer.from_pretrained(root).pad_token is None
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_sadr_run_with_sadr_and_drift(family, tokenizer_dir, tmp_path):
    model_dir = tmp_path / "model"
    make_model(family).save_pretrained(model_dir)
    for name in os.listdir(tokenizer_dir):
        (model_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    out = tmp_path / "run"
    args = [
        "model=local", f"model.source={model_dir}", f"model.family={family}",
        "model.stats.corpus=generated", "model.stats.n_samples=16", "model.stats.sample_length=24",
        "editor.layers=[1]", "editor.v_loss_layer=3", "editor.v_num_grad_steps=4", "editor.context_templates=[[2,5]]",
        "sadr.lambda=0.1", "sadr.heads=all", "eval.drift=true",
        f"dataset.path={FIXTURE}", "dataset.limit=1", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "sadr.cli.run", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    (row,) = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert row["sadr_lambda"] == 0.1
    # sadr.heads=all regularises every head of the layers after the edited one (2 and 3 of 4)
    assert row["diagnostics"]["selected_heads"] > 0 and row["diagnostics"]["loss"] >= 0
    assert "drift_max" in row["edited"] and "subject_attention" in row["unedited"]
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"efficacy", "drift_max"} <= set(metrics["metric"])
    env_json = json.loads((out / "environment.json").read_text())
    assert env_json["stats_corpus"]["kind"] == "generated"
