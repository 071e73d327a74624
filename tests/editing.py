"""Building editors on tiny models for tests, from the real structured config."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from sadr.conf.registry import compose_config
from sadr.data.corpus import Corpus
from sadr.data.records import EditRequest
from sadr.editors import spread
from sadr.editors.covariance import SecondMomentStatistics
from sadr.editors.plugin import EditorServices
from sadr.editors.registry import EDITORS
from sadr.models.adapters import adapter_for
from tests.tiny_models import CORPUS, make_model

TEMPLATES = ["{}", "The city. {}", "Because I said. {}", "You know. {}"]


def editor_config(name: str = "rome", **overrides):
    # random tiny models have MLP outputs of norm ~0.05, so the step size is scaled down and the clamp opened
    base = dict(name=name, layers=[1], v_loss_layer=3, v_num_grad_steps=30, v_lr=0.05, clamp_norm_factor=100.0,
                v_weight_decay=0.0)
    base.update(overrides)
    return OmegaConf.structured(EDITORS[name].config(**base))


def random_texts(n: int = 96, words: int = 24, seed: int = 0) -> list[str]:
    """Seeded shuffles of the tiny corpus's words: enough distinct contexts for a full-rank C."""
    vocabulary = " ".join(CORPUS).split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(n)]


def statistics(model, tokenizer, cache_dir):
    corpus = Corpus({"kind": "tiny-random", "seed": 0}, lambda: iter(random_texts()))
    return SecondMomentStatistics(model, adapter_for(model), tokenizer, fingerprint="tiny", corpus=corpus,
                                  sample_length=64, batch_tokens=512, cache_dir=cache_dir)


# A batch of ten edits for the multi-layer editors: each subject ends its prompt and has a last token of its
# own, each new object is a distinct single token of the tiny tokenizer.
BATCH_SUBJECTS = ["France", "Italy", "Spain", "Brazil", "England", "London", "Berlin", "Toyota", "Rome", "America"]
BATCH_TARGETS = ["Japan", "Paris", "capital", "based", "and", "you", "play", "Lond", "Hond", "Fran"]


def batch_requests(n: int = 10) -> list[EditRequest]:
    return [EditRequest(prompt="The capital city of {}", subject=s, target_new=t)
            for s, t in zip(BATCH_SUBJECTS[:n], BATCH_TARGETS[:n])]


def spread_config(name: str, **overrides):
    """MEMIT/PMET on layers 1-2 of a tiny model: TEMPLATES is the bare prompt + one group of 3 prefixes, and
    λ is scaled to the tiny models' key second moments (published λ are for keys of norm ~10-100)."""
    return editor_config(name, **{"layers": [1, 2], "context_templates": [[10, 3]], "mom2_update_weight": 1.0,
                                  "v_num_grad_steps": 8, **overrides})


@dataclass
class BatchEdit:
    """A tiny model of one family after one `apply` of `batch_requests()`, with what is needed to check it."""

    model: torch.nn.Module
    before: dict[str, torch.Tensor]  # the state dict before the edit
    outcome: object
    second_moments: dict[int, torch.Tensor]
    requests: list[EditRequest]
    mom2_weight: float


def batch_edit(name: str, family: str, tokenizer, cache_dir, **overrides) -> BatchEdit:
    """Build editor `name` from the registry on a fresh tiny model and edit the ten-request batch at once."""
    model = make_model(family)
    stats = statistics(model, tokenizer, cache_dir)
    hparams = spread_config(name, **overrides)
    editor = EDITORS[name].build(model, adapter_for(model), tokenizer, hparams, EditorServices(stats, TEMPLATES))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    requests = batch_requests()
    outcome = editor.apply(requests)
    return BatchEdit(model, before, outcome, stats.take(editor.layers), requests, hparams.mom2_update_weight)


def assert_ridge_solutions(edit: BatchEdit) -> None:
    """Each layer's ΔW solves min Σ‖ΔW kᵢ − rᵢ‖² + λ tr(ΔW C ΔWᵀ) for the K and R the editor used: it meets
    the normal equations ΔW (λC + KᵀK) = Rᵀ K, and equals an independent least-squares solve of the
    stacked system [K; √λ C^½] ΔWᵀ = [R; 0]."""
    lam = edit.mom2_weight
    for solve in edit.outcome.solves:
        keys, residuals = solve.keys.double(), solve.residuals.double()
        c = edit.second_moments[solve.layer].double()
        update = solve.update.dense()
        lhs = update @ (lam * c + keys.T @ keys)
        rhs = residuals.T @ keys
        assert (lhs - rhs).norm() <= 1e-8 * rhs.norm(), solve.layer
        evals, evecs = torch.linalg.eigh(c)
        c_half = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
        stacked = torch.cat([keys, lam ** 0.5 * c_half])
        wanted = torch.cat([residuals, torch.zeros(c.shape[0], residuals.shape[1], dtype=torch.float64)])
        expected = torch.linalg.lstsq(stacked, wanted, driver="gelsd").solution.T
        assert (update - expected).norm() <= 1e-6 * expected.norm(), solve.layer


def assert_every_new_object_is_the_argmax(edit: BatchEdit, tokenizer) -> None:
    for request in edit.requests:
        target = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
        assert len(target) == 1
        assert top1(edit.model, tokenizer, request.text) == target[0], request


def assert_only_the_updates_were_written(edit: BatchEdit) -> None:
    """Every parameter but the edited down-projections is bitwise unchanged; those changed by their ΔW."""
    adapter = adapter_for(edit.model)
    after = edit.model.state_dict()
    edited = {adapter.mlp_down.format(layer) + ".weight": layer for layer in edit.outcome.updates}
    for name, value in edit.before.items():
        if name not in edited:
            assert torch.equal(value, after[name]), name
            continue
        change = after[name] - value
        change = change.T if adapter.down_weight_is_transposed else change
        torch.testing.assert_close(change.double(), edit.outcome.updates[edited[name]].dense(), rtol=1e-4, atol=1e-6)


def top1(model, tokenizer, prompt: str) -> int:
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        return model(input_ids=ids).logits[0, -1].argmax().item()


def composed_editor(editor: str, model: str):
    """The `editor` node that `sadr-run editor=<editor> model=<model>` composes and validates."""
    return compose_config([f"editor={editor}", f"model={model}"]).editor


def record_deltas(monkeypatch) -> list:
    """Make the multi-layer editors append every `DeltaResult` they compute to the returned list."""
    results = []
    original = spread.optimize_delta

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(spread, "optimize_delta", recording)
    return results
