"""Typed structured configs: a typo or a wrong type fails at composition, naming the key and what it accepts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf

from sadr.conf.validation import CACHE_DIR, resolved_cache_dir
from sadr.evaluation.probes import METRICS


# One value each, on purpose: the reference configs carry these keys, so a config that asks for another strategy or
# divergence fails at composition instead of being run with this one (docs/fidelity.md, row 3). Nothing branches on them.
class FactToken(Enum):
    subject_last = "subject_last"  # the subject's last token: the only strategy the published runs use


class SamplingStyle(Enum):
    """How texts are sampled: context templates (`editor.context_template_style`) and fluency's texts
    (`eval.generation_style`)."""

    # length - 1 new tokens after a seed word, or `length` new tokens after a generation prompt; EOS never drawn; the
    # text as decoded (the default until 2026-11-27 for templates, until 2026-12-06 for fluency)
    fixed = "fixed"
    # the default. ROME's generate_fast: the length counts the prompt's tokens (BOS included), EOS may be drawn and
    # sampling goes on after it, NFKD and "\n\n" -> " " (docs/fidelity.md, rows 7 and 11)
    reference = "reference"


class EditProtocol(Enum):
    single = "single"  # edit one request, evaluate, restore
    batch = "batch"  # edit editor.batch_size requests at once, evaluate each, restore
    sequential = "sequential"  # edit batches one after another without restoring; evaluate all at the end


class DType(Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float64 = "float64"


class StatsDType(Enum):
    float64 = "float64"
    float32 = "float32"


class FactorDevice(Enum):
    model = "model"  # C's factors stay on the model's device, where the solves run
    cpu = "cpu"  # factored on the model's device, then kept in host memory and solved there: the GPU holds none


class StatsCorpus(Enum):
    auto = "auto"  # `generated` for the embedded offline model, `hub` otherwise
    hub = "hub"  # a Hugging Face text dataset (stats.hub_dataset / hub_config / hub_split), sampled by stats.hub_sample
    generated = "generated"  # text the model itself samples from a fixed seed
    file = "file"  # a user's UTF-8 text file (stats.text_file), one document per blank-line-separated block


class HubSample(Enum):
    random = "random"  # n_samples documents drawn at random (seed stats.sample_seed), as ROME's code draws them
    first = "first"  # the first n_samples documents, streamed (no full download)


class InvalidRecordPolicy(Enum):
    error = "error"
    skip = "skip"


class ZsreTarget(Enum):
    answers = "answers"  # ROME/MEMIT: edit towards answers[0]
    alt = "alt"  # EasyEdit: edit towards the counterfactual `alt`


class SadrHeads(Enum):
    selective = "selective"
    all = "all"


class Divergence(Enum):  # see FactToken
    kl = "kl"


@dataclass
class StatsConfig:
    """Where the key second moment C = E[k kᵀ] comes from (shared by every editor for a given model)."""

    corpus: StatsCorpus = StatsCorpus.auto
    hub_dataset: str = "wikitext"
    hub_config: Optional[str] = "wikitext-103-raw-v1"
    hub_split: str = "train"
    hub_sample: HubSample = HubSample.random
    sample_seed: int = 1  # ROME's `random_sample=1`
    text_file: Optional[str] = None
    n_samples: int = 100000  # documents (or generated texts)
    sample_length: int = 1024  # tokens kept per document
    batch_tokens: int = 8192  # token budget of one forward batch
    # float32: each chunk's Σ k kᵀ in float32, added to float64 sums (for cards whose float64 is slow)
    product_dtype: StatsDType = StatsDType.float64
    # float32: C's LU factors in float32, half the memory, float32 accuracy (the reference inverts C in float32)
    factor_dtype: StatsDType = StatsDType.float64
    factor_device: FactorDevice = FactorDevice.model
    npz_dir: Optional[str] = None  # folder of ROME-format <module>_float32_mom2_<n>.npz files to load instead


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in results and in the per-(editor, model) defaults
    source: str = MISSING  # hub id, local directory, GGUF file, or "embedded:smollm2"
    gguf_file: Optional[str] = None  # a GGUF file in `source`: a local folder or a hub repository (fetched once)
    revision: Optional[str] = None
    family: Optional[str] = None  # expected config.model_type, checked after loading
    stats: StatsConfig = field(default_factory=StatsConfig)


@dataclass
class EditorConfig:
    """What every editor is configured with. Each editor's module derives its own config from this one, with its
    defaults and its own keys (sadr/editors/plugin.py); `editor=<name>` selects that typed node."""

    name: str = MISSING
    source: str = ""  # where these hyperparameters were published, or how they were chosen
    layers: List[int] = MISSING
    fact_token: FactToken = FactToken.subject_last  # where keys are read, δ is added and SADR selects heads
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int = MISSING
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    # (max tokens, number of prefixes) of the generated context templates, besides the bare prompt
    context_templates: List[List[int]] = field(default_factory=lambda: [[10, 5]])
    context_template_style: SamplingStyle = SamplingStyle.reference
    protocol: EditProtocol = EditProtocol.single
    batch_size: int = 1
    # single protocol: edit and evaluate this many cases side by side, each on the unedited model (their δs share
    # forwards; the edited models are evaluated in one pass, without writing weights). Same results as 1, up to
    # float rounding; meant for a GPU, where a forward has room for many more rows (README, "Single edits side by side").
    # null: 8 on a GPU where the single protocol runs without save_edited, else 1; a group that runs out of GPU memory
    # is split in half and redone
    parallel_cases: Optional[int] = None
    # δ-optimisation: run each prompt's tokens before its δ position once (their keys and values cached) and feed each
    # step only the tokens from there to the last one the loss reads. Same results up to float rounding, 1.5-2x
    # faster edits on the offline default (README, Speed); false feeds whole prompts at every step, as the reference does
    prefix_cache: bool = True
    # δ-optimisation: stop when the editor's stop rule says so (the reference code's behaviour); false runs every δ all
    # v_num_grad_steps steps, e.g. to compare two settings at equal steps
    early_stop: bool = True


@dataclass
class DatasetConfig:
    name: str = MISSING  # format: offline_counterfact | counterfact | multi_counterfact | zsre | knowedit_counterfact | sadr_merged
    path: Optional[str] = None  # local file; when unset the canonical copy is used (embedded or downloaded)
    url: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None
    limit: Optional[int] = None
    case_ids: Optional[List[Any]] = None
    shard: Optional[str] = None  # "i/n": the i-th (1-based) of n contiguous shards
    on_invalid: InvalidRecordPolicy = InvalidRecordPolicy.error
    target: ZsreTarget = ZsreTarget.answers


def _sadr_config_class():
    # `lambda` is a Python keyword, so the dataclass is built without generated __init__/__repr__/__eq__
    # (whose generated source would name the field); OmegaConf only reads its fields and defaults.
    namespace: dict[str, Any] = {
        "__annotations__": {
            "lambda": float,
            "heads": SadrHeads,
            "layers": Optional[List[int]],
            "divergence": Divergence,
            "epsilon": float,
            "in_stop_rule": bool,
        },
        "__doc__": "Selective Attention Drift Restriction: `lambda` is γ (0 = the plain editor, bit for bit).",
        "lambda": 0.0,
        "heads": SadrHeads.selective,
        "layers": None,
        "divergence": Divergence.kl,
        "epsilon": 1e-8,
        "in_stop_rule": True,
    }
    return dataclasses.dataclass(init=False, repr=False, eq=False)(type("SadrConfig", (), namespace))


SadrConfig = _sadr_config_class()


@dataclass
class EvalConfig:
    batch_size: int = 64  # (prompt, target) pairs per forward
    # teacher-forced metrics (sadr/evaluation/probes.py); each applies only to cases that have its prompts
    metrics: List[str] = field(default_factory=lambda: list(METRICS))
    # fluency (and consistency) from sampled continuations of each case's generation_prompts
    generation: bool = False
    generation_prompts_per_case: Optional[int] = 2  # the first N prompts of a case; null = all (ROME: all 10)
    # top-k 5. reference: ROME's, each text grows to generation_length tokens counting its prompt (max_out_len=100);
    # fixed: generation_length tokens sampled after the prompt, EOS never drawn
    generation_style: SamplingStyle = SamplingStyle.reference
    generation_length: int = 100
    # reference style: texts sampled side by side (each has its own random stream, so this changes them only through
    # the rounding of other batch shapes); each row keeps a KV cache of about 2 × layers × generation_length × hidden
    # values (GPT-J in float32: about 92 MB)
    generation_batch_size: int = 16
    # folder with ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json; unset: no consistency column
    consistency_dir: Optional[str] = None
    consistency_download: bool = False  # fetch missing files (~1 GB, size and sha256 checked) into consistency_dir
    drift: bool = True  # attention drift to the edited subject on the DNS prompts (sadr/evaluation/drift.py)


@dataclass
class ProgressConfig:
    """What a run prints while it works (not part of a run's identity: changing it never blocks a resume)."""

    bar: bool = True  # a progress bar over cases with rate and ETA, on stderr (never in the run's log file)
    case_lines: bool = False  # one INFO line per finished case (its metrics and phase times)


def default_cache_dir() -> str:
    """`cache_dir`'s default, resolved: where `sadr-run` keeps its caches when none is set (the benchmarks' default)."""
    return resolved_cache_dir(OmegaConf.create({"cache_dir": CACHE_DIR}))


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    editor: EditorConfig = MISSING
    dataset: DatasetConfig = MISSING
    sadr: Any = field(default_factory=SadrConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: DType = DType.float32
    # CUDA only: float32 matrix products in TensorFloat-32 (Ampere and later cards). Several times faster float32
    # statistics passes and δ steps, products to about 1e-3 relative, caches kept apart (README, "TF32"). PyTorch
    # 1.7-1.11 turned it on by default: ROME's published environment pins 1.10.2, MEMIT's 1.12.1 (off)
    tf32: bool = False
    # CPU threads of this job's torch operations (null: as the process has them; torch's default is every core, or
    # OMP_NUM_THREADS). Jobs that run at once on one machine (hydra/launcher=local) should share the cores: README,
    # "Sweeps"
    threads: Optional[int] = None
    seed: int = 0
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    # write the edited model as a folder from_pretrained loads: a sequential run's final model, or every
    # group's model in single/batch runs (one full copy each: select the cases with dataset.case_ids)
    save_edited: bool = False
    cache_dir: str = CACHE_DIR
    output_dir: str = "${hydra:runtime.output_dir}"
