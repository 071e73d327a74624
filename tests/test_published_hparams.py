"""Every key of every published (editor, model) setting, as composed, against the public reference files.

Each row is the whole `editor` node less the run-time keys, so a key a file adds, drops or changes, or a schema
default that moves under a file that leaves the key out, fails here. Values copied by hand from
../shared/docs/hparams.md and the files it names (read 2026-12-06): ROME repo hparams/ROME/*.json, MEMIT repo
hparams/MEMIT/*.json and hparams/ROME/EleutherAI_gpt-neox-20b.json, EasyEdit hparams/{ROME,MEMIT,PMET}/llama-7b.yaml,
the SADR repo's (PinzhengWang322/Reveal_Attention_Drift) hparams/{ROME,MEMIT,PMET}/*.yaml and examples/scripts/*.sh,
and AlphaEdit's hparams/AlphaEdit/*.json.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sadr.conf.registry import compose_config
from sadr.models.adapters import ADAPTERS

# keys that choose how a run executes, not which edit it makes (and `source`, checked on its own below)
RUNTIME = {"name", "source", "protocol", "batch_size", "parallel_cases", "prefix_cache", "early_stop",
           "context_template_style", "rome_update"}
ROME_TEMPLATES = [[5, 10], [10, 10]]  # bare prompt + 10 of <= 5 tokens + 10 of <= 10 (ROME's rome_main.py)
MEMIT_TEMPLATES = [[10, 5]]  # bare prompt + 5 of <= 10 tokens (MEMIT's, PMET's and AlphaEdit's *_main.py)


def rome(layer, steps, loss_layer, wd, mom2_adjustment, clamp=4.0):
    return dict(layers=[layer], fact_token="subject_last", v_num_grad_steps=steps, v_lr=0.5, v_loss_layer=loss_layer,
                v_weight_decay=wd, clamp_norm_factor=clamp, kl_factor=0.0625, context_templates=ROME_TEMPLATES,
                mom2_adjustment=mom2_adjustment)


def memit(layers, clamp, steps, loss_layer, wd, update_weight, v_lr=0.5):
    return dict(layers=list(layers), fact_token="subject_last", v_num_grad_steps=steps, v_lr=v_lr,
                v_loss_layer=loss_layer, v_weight_decay=wd, clamp_norm_factor=clamp, kl_factor=0.0625,
                context_templates=MEMIT_TEMPLATES, mom2_update_weight=update_weight)


def pmet(layers, clamp, steps, v_lr, loss_layer, wd, kl, update_weight):
    row = memit(layers, clamp, steps, loss_layer, wd, update_weight, v_lr)
    return {**row, "kl_factor": kl, "nll_loss_factor": 1.0}


def alphaedit(layers, clamp, steps, loss_layer, v_lr=0.5):
    row = memit(layers, clamp, steps, loss_layer, 0.5, None, v_lr)
    del row["mom2_update_weight"]  # AlphaEdit's update has no λC term (its json carries the key, unread)
    return {**row, "nullspace_threshold": 0.02, "L2": 10.0}


GPT2 = range(13, 18)
GPTJ = range(3, 9)
LLAMA = range(4, 9)
TINY = range(3, 6)
PUBLISHED = {
    # ROME (v_lr 0.5, clamp 4 unless given)
    ("rome", "gpt2-xl"): rome(17, 20, 47, 0.5, True),  # ROME repo hparams/ROME/gpt2-xl.json
    ("rome", "gpt-j"): rome(5, 20, 27, 0.5, True),  # ROME repo hparams/ROME/EleutherAI_gpt-j-6B.json
    ("rome", "gpt-neox-20b"): rome(15, 20, 43, 0.5, True),  # MEMIT repo hparams/ROME/EleutherAI_gpt-neox-20b.json
    ("rome", "llama2-7b"): rome(5, 25, 31, 1e-3, False),  # EasyEdit hparams/ROME/llama-7b.yaml
    ("rome", "llama3-8b"): rome(5, 25, 31, 1e-3, True),  # SADR repo hparams/ROME/llama-8b.yaml
    ("rome", "llama2-13b"): rome(6, 20, 39, 1e-3, True),  # SADR repo hparams/ROME/llama-13b.yaml
    ("rome", "tinyllama"): rome(4, 20, 21, 0.5, True, clamp=2.0),  # SADR repo hparams/ROME/tinyllama.yaml
    # MEMIT
    ("memit", "gpt2-xl"): memit(GPT2, 0.75, 20, 47, 0.5, 20000.0),  # MEMIT repo (= AlphaEdit's hparams/MEMIT copy)
    ("memit", "gpt-j"): memit(GPTJ, 0.75, 25, 27, 0.5, 15000.0),  # MEMIT repo hparams/MEMIT/EleutherAI_gpt-j-6B.json
    ("memit", "llama3-8b"): memit(LLAMA, 4.0, 20, 31, 1e-3, 15000.0),  # SADR repo hparams/MEMIT/llama-8b.yaml
    ("memit", "llama2-7b"): memit(LLAMA, 4.0, 25, 31, 1e-3, 15000.0),  # EasyEdit hparams/MEMIT/llama-7b.yaml
    ("memit", "tinyllama"): memit(TINY, 8.0, 20, 21, 0.5, 20000.0),  # SADR repo hparams/MEMIT/tinyllama.yaml
    # PMET
    ("pmet", "gpt-j"): pmet(GPTJ, 0.75, 30, 0.2, 27, 0.5, 1.0, 6000.0),  # PMET repo (EasyEdit, SADR repo: 15000)
    ("pmet", "llama3-8b"): pmet(LLAMA, 4.0, 20, 0.5, 31, 0.5, 0.0625, 15000.0),  # SADR repo hparams/PMET/llama-8b.yaml
    ("pmet", "llama2-7b"): pmet(LLAMA, 1.0, 20, 0.5, 31, 0.5, 0.0625, 15000.0),  # EasyEdit hparams/PMET/llama-7b.yaml
    ("pmet", "tinyllama"): pmet(TINY, 4.0, 20, 0.5, 21, 0.5, 0.0625, 20000.0),  # SADR repo hparams/PMET/tinyllama.yaml
    # AlphaEdit repo hparams/AlphaEdit/*.json
    ("alphaedit", "gpt2-xl"): alphaedit(GPT2, 0.75, 20, 47),
    ("alphaedit", "gpt-j"): alphaedit(GPTJ, 0.75, 25, 27),
    ("alphaedit", "llama3-8b"): alphaedit(LLAMA, 0.75, 25, 31, v_lr=0.1),
}

# setup=sadr_repo: the SADR repo's examples/run_knowedit.py sets v_lr from --lr (default 0.5) and v_num_grad_steps
# from --v_num_grad_steps (default 20; the baselines of examples/scripts/*.sh pass 20) over its hparams files, whose
# PMET GPT-J file has mom2_update_weight 15000. sadr=paper: the scripts' SADR arms, --attn_W_loss_weight × 1e-4.
SADR_REPO = {
    ("rome", "gpt-j"): {"v_num_grad_steps": 20},
    ("rome", "llama3-8b"): {"v_num_grad_steps": 20},
    ("rome", "gpt-neox-20b"): {},
    ("memit", "gpt-j"): {"v_num_grad_steps": 20},
    ("memit", "llama3-8b"): {},
    ("pmet", "gpt-j"): {"v_num_grad_steps": 20, "v_lr": 0.5, "mom2_update_weight": 15000.0},
    ("pmet", "llama3-8b"): {},
}
REPOSITORIES = ("ROME repo", "MEMIT repo", "PMET repo", "AlphaEdit repo", "SADR repo", "EasyEdit")

# docs/hparams.md, "Model families and their module names"
MODULES = {
    "gpt2": ("transformer.h", "transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn.c_proj", "transformer.ln_f", True),
    "gptj": ("transformer.h", "transformer.h.{}.mlp.fc_out", "transformer.h.{}.attn.out_proj", "transformer.ln_f",
             False),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}.attention.dense",
                 "gpt_neox.final_layer_norm", False),
    **{family: ("model.layers", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj", "model.norm",
                False) for family in ("llama", "mistral", "qwen2")},
}


def edit_settings(overrides: list[str]) -> dict:
    editor = compose_config(overrides).editor
    settings = OmegaConf.to_container(editor, enum_to_str=True)
    return {key: value for key, value in settings.items() if key not in RUNTIME}


@pytest.mark.parametrize("editor, model", PUBLISHED)
def test_every_key_of_a_published_setting_is_the_published_value(editor, model):
    assert edit_settings([f"editor={editor}", f"model={model}"]) == PUBLISHED[editor, model]


@pytest.mark.parametrize("editor, model", SADR_REPO)
def test_setup_sadr_repo_changes_only_what_the_sadr_authors_code_overrode(editor, model):
    expected = {**PUBLISHED[editor, model], "v_lr": 0.5, "v_num_grad_steps": 20, **SADR_REPO[editor, model]}
    assert edit_settings([f"editor={editor}", f"model={model}", "setup=sadr_repo"]) == expected


@pytest.mark.parametrize("family", MODULES)
def test_module_names_are_the_published_ones(family):
    adapter = ADAPTERS[family]
    got = (adapter.layers, adapter.mlp_down, adapter.attn_out, adapter.final_norm, adapter.down_weight_is_transposed)
    assert got == MODULES[family]


def test_every_settings_file_names_its_source():
    """A published setting names the repository it comes from; any other says that this project chose it."""
    for path in sorted((Path(__file__).parents[1] / "sadr" / "conf" / "hparams").glob("*.yaml")):
        editor, model = path.stem.split("_", 1)
        source = compose_config([f"editor={editor}", f"model={model}"]).editor.source
        if (editor, model) in PUBLISHED:
            assert any(repo in source for repo in REPOSITORIES), path.name
        else:
            assert source.startswith("chosen by this project"), path.name


# the published setting whose values each editor's schema defaults are (with 20 δ steps, ROME's, throughout)
SCHEMA_DEFAULTS = {"rome": ("rome", "gpt-j"), "memit": ("memit", "gpt-j"), "pmet": ("pmet", "llama3-8b"),
                   "alphaedit": ("alphaedit", "gpt-j")}


@pytest.mark.parametrize("editor", SCHEMA_DEFAULTS)
def test_a_model_without_a_settings_file_gets_the_schema_defaults_of_one_published_setting(editor):
    """`model=local` has no settings file: every key but the layers and loss layer given comes from the schema."""
    published = PUBLISHED[SCHEMA_DEFAULTS[editor]]
    layers = ",".join(str(layer) for layer in published["layers"])
    settings = edit_settings([f"editor={editor}", "model=local", f"model.source={Path(__file__).parent}",
                              f"editor.layers=[{layers}]", f"editor.v_loss_layer={published['v_loss_layer']}"])
    assert settings == {**published, "v_num_grad_steps": 20}
