"""Building editors on tiny models for tests, from the real structured config."""
from __future__ import annotations

import random

from omegaconf import OmegaConf

from sadr.conf.schema import EditorConfig
from sadr.data.corpus import Corpus
from sadr.editors.covariance import SecondMomentStatistics
from sadr.models.adapters import adapter_for
from tests.tiny_models import CORPUS

TEMPLATES = ["{}", "The city. {}", "Because I said. {}", "You know. {}"]


def editor_config(name: str = "rome", **overrides):
    # random tiny models have MLP outputs of norm ~0.05, so the step size is scaled down and the clamp opened
    base = dict(name=name, layers=[1], v_loss_layer=3, v_num_grad_steps=30, v_lr=0.05, clamp_norm_factor=100.0,
                v_weight_decay=0.0)
    base.update(overrides)
    return OmegaConf.structured(EditorConfig(**base))


def random_texts(n: int = 96, words: int = 24, seed: int = 0) -> list[str]:
    """Seeded shuffles of the tiny corpus's words: enough distinct contexts for a full-rank C."""
    vocabulary = " ".join(CORPUS).split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(n)]


def statistics(model, tokenizer, cache_dir):
    corpus = Corpus({"kind": "tiny-random", "seed": 0}, lambda: iter(random_texts()))
    return SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="tiny", corpus=corpus,
                                  sample_length=64, batch_tokens=512, cache_dir=cache_dir)
