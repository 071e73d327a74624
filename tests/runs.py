"""Shared by the end-to-end tests: the real config composed around a tiny saved model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sadr.conf.registry import compose_config
from tests.data_fixtures import FIXTURES
from tests.editing import random_texts
from tests.tiny_models import make_model, make_tokenizer

FIXTURE = FIXTURES / "offline_counterfact.json"
# the offline records the package ships (20 cases), for runs that need more than the fixture's
OFFLINE_RECORDS = Path(__file__).parents[1] / "sadr" / "data" / "offline" / "counterfact_offline.json"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama saved like any local model, and a text file for its key statistics."""
    root = tmp_path_factory.mktemp("tiny")
    make_model("llama").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "corpus.txt").write_text("\n\n".join(random_texts()))
    return root


def tiny_overrides(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=local", f"model.source={tiny_dir / 'model'}", "model.family=llama",
        "model.stats.corpus=file", f"model.stats.text_file={tiny_dir / 'corpus.txt'}", "model.stats.sample_length=64",
        "editor.layers=[1]", "editor.v_loss_layer=3", "editor.v_num_grad_steps=6", "editor.v_lr=0.05",
        "editor.clamp_norm_factor=100", "editor.context_templates=[[5,5]]",
        f"dataset.path={FIXTURE}", "dataset.limit=2", f"output_dir={out}", f"cache_dir={tiny_dir / 'cache'}",
        *extra,
    ]


def composed(overrides: list[str]):
    return compose_config(overrides)


def written_rows(out: Path) -> list[dict]:
    """The rows a run wrote to its cases.jsonl."""
    return [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
