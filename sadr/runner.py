"""One experiment: load model and data, score the unedited model once, edit, evaluate, write rows.

Protocols (recorded in every row):
- single / batch: edit `editor.batch_size` requests at once, evaluate them, restore the weights bitwise;
  single with `editor.parallel_cases` N > 1 runs N single edits side by side, each on the unedited model, without
  writing weights (`_parallel_single`);
- sequential: edit the batches one after another without restoring, evaluate every case at the end.
  After each batch the editor's state (its edited weights and anything else it carries) is checkpointed in
  the run directory, so an interrupted sequential run resumes from the last finished batch.

With `save_edited=true` the edited model is also written as a loadable folder (sadr/models/saving.py).
"""
from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sadr.cache import JSON, TORCH, cached, writable_dir, write_atomically
from sadr.conf.validation import validate_layers
from sadr.data.corpus import file_corpus, generated_corpus, hub_corpus, text_file
from sadr.data.lengths import EDIT_PROMPT, GENERATION_PROMPTS, check_prompt_lengths, generated_after_prompt
from sadr.data.load import load_cases
from sadr.data.records import EditCase
from sadr.data.registry import FORMATS
from sadr.editors.base import Editor, EditOutcome
from sadr.editors.context_templates import context_templates
from sadr.editors.covariance import SecondMomentStatistics, check_rome_npz_dir
from sadr.editors.delta_checkpoint import discard_deltas, resumable_deltas
from sadr.editors.low_rank import PerRowUpdates
from sadr.editors.plugin import EditorServices
from sadr.editors.registry import EDITORS
from sadr.errors import DamagedFileError, DeviceMemoryError, InvalidSettingError
from sadr.evaluation.aggregate import LABELS, compact_table, metric_table, scored_fields
from sadr.evaluation.probes import check_metrics_apply, resolve_metrics
from sadr.evaluation.suite import Evaluator, build_evaluators, compare_all, evaluate_all
from sadr.models.embedded import EMBEDDED_SOURCES
from sadr.models.devices import PhasePeaks, release_unused_memory, reset_peak_memory, set_tf32, take_peak_memory
from sadr.models.fingerprint import cache_key, computation_fingerprint, model_fingerprint, tokenizer_fingerprint
from sadr.models.kept import load_model_kept
from sadr.models.loading import LoadedModel
from sadr.models.saving import save_edited_model
from sadr.progress import Progress
from sadr.regularizers.attention_drift import build_regularizers
from sadr.regularizers.base import DeltaRegularizer
from sadr.results import DELTA_CHECKPOINT, SEQUENTIAL_STATE, RunDirectory
from sadr.versions import warn_if_untested

log = logging.getLogger(__name__)

EDITED_MODEL, EDITED_MODELS = "edited_model", "edited_models"  # sequential: one folder; single/batch: one per group


def statistics_layers(cfg: DictConfig) -> list[int]:
    """The layers whose key statistics C the editor reads (none: ROME without the mom2 adjustment)."""
    return list(EDITORS[cfg.editor.name].statistics_layers(cfg.editor))


def build_statistics(cfg: DictConfig, loaded: LoadedModel, fingerprint: str) -> SecondMomentStatistics:
    stats = cfg.model.stats
    corpus_kind = stats.corpus.name
    if corpus_kind == "auto":
        corpus_kind = "generated" if cfg.model.source in EMBEDDED_SOURCES else "hub"
    # no corpus is read where C comes from ROME's files, or where the editor reads no layer's
    corpus = None if stats.npz_dir or not statistics_layers(cfg) else {
        "hub": lambda: hub_corpus(stats.hub_dataset, stats.hub_config, stats.hub_split, stats.n_samples,
                                  stats.hub_sample.name, stats.sample_seed),
        "file": lambda: file_corpus(stats.text_file, stats.n_samples),
        "generated": lambda: generated_corpus(loaded.model, loaded.tokenizer, stats.n_samples, stats.sample_length,
                                              cfg.seed, stats.batch_tokens, fingerprint=fingerprint,
                                              cache_dir=cfg.cache_dir),
    }[corpus_kind]()
    return SecondMomentStatistics(
        loaded.model, loaded.adapter, loaded.tokenizer, fingerprint=fingerprint, corpus=corpus,
        sample_length=stats.sample_length, batch_tokens=stats.batch_tokens, cache_dir=cfg.cache_dir,
        npz_dir=stats.npz_dir, npz_samples=stats.n_samples, product_dtype=getattr(torch, stats.product_dtype.name),
        factor_dtype=getattr(torch, stats.factor_dtype.name), factors_on_host=stats.factor_device.name == "cpu",
    )


def check_statistics_inputs(cfg: DictConfig) -> None:
    """The files the key statistics are read from (model.stats.npz_dir, model.stats.text_file), before the model
    loads (minutes at paper scale); none for an editor that reads no C. Each layer's own ROME file is checked once
    the model names its module."""
    stats = cfg.model.stats
    if not statistics_layers(cfg):
        return
    if stats.npz_dir:  # the corpus is not read
        check_rome_npz_dir(stats.npz_dir, stats.n_samples)
    elif stats.corpus.name == "file":
        text_file(stats.text_file)


def editor_templates(cfg: DictConfig, loaded: LoadedModel, fingerprint: str) -> list[str]:
    """The context templates `cfg.editor` asks for, sampled from the loaded model (cached under `fingerprint`)."""
    return context_templates(loaded.model, loaded.tokenizer, [list(p) for p in cfg.editor.context_templates],
                             seed=cfg.seed, fingerprint=fingerprint, cache_dir=cfg.cache_dir,
                             style=cfg.editor.context_template_style.name)


def build_editor(cfg: DictConfig, loaded: LoadedModel, statistics: SecondMomentStatistics, fingerprint: str,
                 regularizers: list[DeltaRegularizer]) -> Editor:
    """The editor `cfg` describes, with its templates, key statistics and `regularizers` (SADR's when γ > 0)."""
    services = EditorServices(statistics, editor_templates(cfg, loaded, fingerprint), regularizers)
    return EDITORS[cfg.editor.name].build(loaded.model, loaded.adapter, loaded.tokenizer, cfg.editor, services)


UNEDITED_CHUNK = 256  # cases per cache entry of the unedited model's results


def unedited_results(loaded: LoadedModel, cases: list[EditCase], evaluators: list[Evaluator], fingerprint: str,
                     cache_dir: str, progress: bool = False) -> list[dict]:
    """The unedited model's results, computed once per (model, cases, evaluators) and cached on disk, a chunk of
    UNEDITED_CHUNK cases per entry: a run stopped while it scores a large selection (10,000 CounterFact cases take
    about 20 minutes on GPT-J at the 0.12 s per case of an H200) keeps the chunks it finished. A selection of one
    chunk or less has the entry it had before chunks. Its progress is logged (a line a minute) where there are
    several chunks."""
    identities = [e.identity() for e in evaluators]
    results: list[dict] = []
    with Progress(len(cases), progress and len(cases) > UNEDITED_CHUNK, interactive=False,  # log lines, as a pass's
                  label="scoring the unedited model") as bar:
        for start in range(0, len(cases), UNEDITED_CHUNK):
            chunk = cases[start:start + UNEDITED_CHUNK]
            key = cache_key(kind="unedited", model=fingerprint, cases=[repr(c) for c in chunk], evaluators=identities)
            results += cached(Path(cache_dir) / "unedited" / f"{key}{JSON.suffix}",
                              lambda: evaluate_all(evaluators, loaded.model, loaded.tokenizer, loaded.adapter, chunk))
            bar.advance(len(chunk))
    return results


def case_line(row: dict) -> str:
    """One line per finished case: its scores ×100 and its total seconds."""
    scores = " ".join(f"{LABELS[name]} {round(100 * sum(entry['value']) / len(entry['value']))}"
                      for name, entry in row["edited"].items() if name in LABELS and entry.get("value"))
    return f"case {row['case_id']} ({row['subject']}): {scores}; {sum(row['seconds'].values()):.1f} s"


# editor.parallel_cases on a GPU when it is null. On an H100, GPT-J in float32 with 8 ROME cases side by side peaked
# at 39.8 GB (within the 48 GB card of its published runs) and ran 1.4 times the cases per second of one at a time;
# SmolLM2-135M ran 14 times as many at 32 (README, "Single edits side by side").
GPU_PARALLEL_CASES = 8


def parallel_cases(cfg: DictConfig, device: torch.device) -> int:
    """How many single edits run side by side: `editor.parallel_cases`, or when it is null, GPU_PARALLEL_CASES on a
    GPU where the single protocol runs without saving edited models, and 1 otherwise."""
    if cfg.editor.parallel_cases is not None:
        return cfg.editor.parallel_cases
    side_by_side = device.type == "cuda" and cfg.editor.protocol.name == "single" and not cfg.save_edited
    return GPU_PARALLEL_CASES if side_by_side else 1


def case_groups(cases: list[EditCase], batch_size: int) -> list[list[EditCase]]:
    return [cases[i : i + batch_size] for i in range(0, len(cases), batch_size)]


class Experiment:
    """Everything a run needs once loaded; `run()` does the protocol and writes the tables."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        untested_versions = warn_if_untested()
        writable_dir(cfg.cache_dir, "cache_dir")
        self.out = RunDirectory(writable_dir(cfg.output_dir, "output_dir", "hydra.run.dir"))
        self.out.claim(cfg)
        self.out.drop_partial_line()
        torch.manual_seed(cfg.seed)
        self.dataset = load_cases(cfg.dataset, cfg.cache_dir)  # before the model: a bad dataset fails in seconds
        if not self.dataset.cases:
            raise InvalidSettingError(f"no case to run: {self.dataset.why_empty()}")
        self.evaluators = build_evaluators(cfg)  # before the model too: a misspelt eval.metrics fails in seconds
        check_metrics_apply(resolve_metrics(list(cfg.eval.metrics)), self.dataset.cases, cfg.dataset.name)
        check_statistics_inputs(cfg)
        self.loaded, self.fingerprint = load_model_kept(
            cfg.model.source, gguf_file=cfg.model.gguf_file, revision=cfg.model.revision, family=cfg.model.family,
            device=cfg.device, dtype=cfg.dtype.name, cache_dir=cfg.cache_dir)
        validate_layers(cfg.editor, self.loaded.adapter.num_layers(self.loaded.model))
        positions = getattr(self.loaded.model.config, "max_position_embeddings", None)
        check_prompt_lengths(self.dataset.cases, self.evaluators, self.loaded.tokenizer, positions,
                             {EDIT_PROMPT: max((tokens for tokens, _ in cfg.editor.context_templates), default=0),
                              GENERATION_PROMPTS: generated_after_prompt(cfg.eval, positions)})
        reset_peak_memory(self.loaded.device)
        self.tf32 = set_tf32(self.loaded.device, cfg.tf32)
        # what the caches of this model's computations are keyed by (self.fingerprint stays the weights')
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.loaded.tokenizer)
        self.computed_by = computation_fingerprint(self.fingerprint, self.tokenizer_fingerprint, self.tf32,
                                                   self.loaded.device.type)
        self.parallel_cases = parallel_cases(cfg, self.loaded.device)
        self.regularizers = build_regularizers(cfg.sadr)
        self.statistics = build_statistics(cfg, self.loaded, self.computed_by)
        self.statistics.check_files(statistics_layers(cfg))
        self.environment = {
            "device": str(self.loaded.device),
            "device_name": torch.cuda.get_device_name(self.loaded.device) if self.loaded.device.type == "cuda" else "cpu",
            "model_source": self.loaded.resolved_source, "model_fingerprint": self.fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            # resolved: a path relative to where the run was started names no file once read elsewhere
            "dataset_source": str(Path(self.dataset.source).resolve()), "dataset_selection": self.dataset.selection,
            "dataset_invalid_skipped": self.dataset.n_invalid_skipped, "n_cases": len(self.dataset.cases),
            "stats_corpus": self.statistics.description() if statistics_layers(cfg) else None,
            "parallel_cases": self.parallel_cases,
            "factor_device": cfg.model.stats.factor_device.name, "threads": torch.get_num_threads(), "tf32": self.tf32,
            "generation_batch_size": cfg.eval.generation_batch_size,
            "untested_versions": untested_versions,
        }
        self.out.write_environment(self.environment)

    def _editor(self) -> Editor:
        return build_editor(self.cfg, self.loaded, self.statistics, self.computed_by, self.regularizers)

    def _check_sadr_applies(self) -> None:
        """With γ > 0, SADR's term was attached to the δ-optimisation of an edit made afresh (not from δs a stopped
        run kept): an editor that does not optimise δ with sadr's δ-optimisation (a plug-in that fine-tunes weights,
        say) would otherwise give γ > 0 runs identical to γ = 0 ones, under SADR's name."""
        if self.regularizers and not any(reg.attached for reg in self.regularizers):
            raise InvalidSettingError(
                f"sadr.lambda={self.cfg.sadr['lambda']} with editor={self.cfg.editor.name}: its edit did not run "
                "sadr's δ-optimisation (sadr.editors.delta), to which SADR adds its term, so SADR would change "
                "nothing; run this editor with sadr.lambda=0")

    def _evaluate(self, cases: list[EditCase]) -> tuple[list[dict], float]:
        start = time.perf_counter()
        results = evaluate_all(self.evaluators, self.loaded.model, self.loaded.tokenizer, self.loaded.adapter, cases)
        return results, (time.perf_counter() - start) / max(1, len(cases))

    def _row(self, case: EditCase, edited: dict, unedited: dict, outcome: EditOutcome, eval_seconds: float, group_size: int,
             memory: dict) -> dict:
        """`memory`: the GPU peaks of the case's group, while editing and while evaluating (`PhasePeaks.fields`; empty
        off CUDA). A statistics pass records its own peak in its cache entries and its log line."""
        cfg = self.cfg
        edited = {**edited, **compare_all(self.evaluators, edited, unedited)}
        return {
            "case_id": case.case_id, "editor": cfg.editor.name, "protocol": cfg.editor.protocol.name,
            "batch_size": group_size, "sadr_lambda": cfg.sadr["lambda"],
            "sadr": OmegaConf.to_container(cfg.sadr, enum_to_str=True), "model": cfg.model.name,
            "dataset": cfg.dataset.name, "subject": case.request.subject, "target_new": case.request.target_new,
            "edited": edited, "unedited": unedited,
            "seconds": {**outcome.seconds, "eval_per_case": eval_seconds}, "diagnostics": outcome.diagnostics,
            **memory,
        }

    def _write_row(self, row: dict) -> None:
        self.out.append(row)
        (log.info if self.cfg.progress.case_lines else log.debug)("%s", case_line(row))

    def _save_edited(self, cases: list[EditCase], folder: Path) -> None:
        cfg = self.cfg
        note = {"model_fingerprint_before": self.fingerprint, "editor": cfg.editor.name,
                "protocol": cfg.editor.protocol.name,
                "editor_config": OmegaConf.to_container(cfg.editor, resolve=True, enum_to_str=True),
                "sadr": OmegaConf.to_container(cfg.sadr, resolve=True, enum_to_str=True), "run": str(self.out.path)}
        log.info("edited model saved to %s", save_edited_model(self.loaded, folder, cases, note))

    def run(self) -> Path:
        cases = self.dataset.cases
        started = time.perf_counter()
        one_off = PhasePeaks(self.loaded.device)  # kept apart from the first group's peaks
        unedited = dict(zip((str(c.case_id) for c in cases),
                            unedited_results(self.loaded, cases, self.evaluators, self.computed_by, self.cfg.cache_dir,
                                             self.cfg.progress.bar)))
        one_off.end("score_unedited")
        log.info("unedited model scored on %s in %.1f s%s", _counted(len(cases), "case"), time.perf_counter() - started,
                 one_off.described("score_unedited"))
        done = self.out.finished()
        todo = [c for c in cases if str(c.case_id) not in done]
        log.info("%s to edit (%d already finished in %s)", _counted(len(todo), "case"), len(cases) - len(todo),
                 self.out.path)
        if not todo and self.out.deltas_kept():  # killed after its last rows were written, before they were removed
            discard_deltas(self.out.path / DELTA_CHECKPOINT)
        if todo:
            started = time.perf_counter()
            editor = self._editor()
            protocol = self._sequential if self.cfg.editor.protocol.name == "sequential" else self._restoring
            try:
                editor.prepare()
                one_off.end("prepare")
                log.info("the editor's one-off work (context templates, key statistics and what is made of them) "
                         "took %.1f s%s", time.perf_counter() - started, one_off.described("prepare"))
                if one_off.phases:  # on CUDA: the unedited scoring's peak; the one-off work's after the statistics pass
                    self.out.write_environment({**self.environment, "one_off_cuda_peak_bytes": one_off.phases})
                protocol(editor, todo, unedited)
            except torch.cuda.OutOfMemoryError as error:
                detail = (str(error).splitlines() or ["no detail"])[0]
                raise DeviceMemoryError(
                    f"editing ran out of GPU memory ({detail}). model.stats.factor_device=cpu keeps C's factors in "
                    "host memory (d_ff² × 8 bytes per edited layer: 2.1 GB for GPT-J's), and a run resumes with it; "
                    "model.stats.factor_dtype=float32 (half the factors' memory), a smaller editor.batch_size or "
                    "dtype=bfloat16 change the results, so they need a new run directory") from error
        return self._finish()

    def _restoring(self, editor: Editor, todo: list[EditCase], unedited: dict) -> None:
        """single / batch: edit a group, evaluate it, restore the editor's state bitwise, write its rows."""
        if self.parallel_cases > 1:
            self._parallel_single(editor, todo, unedited)
            return
        unedited_state = editor.state_dict()
        # the groups of an uninterrupted run: a group some of whose rows a kill cut off is edited again whole, and
        # only its missing rows written (grouping the remaining cases afresh would edit them in other batches)
        pending = {str(case.case_id) for case in todo}
        groups = [group for group in case_groups(self.dataset.cases, self.cfg.editor.batch_size)
                  if any(str(case.case_id) in pending for case in group)]
        with Progress(len(todo), self.cfg.progress.bar) as progress:
            for group in groups:
                peaks = PhasePeaks(self.loaded.device)
                afresh = not self.out.deltas_kept()  # no δ of a stopped run to read back
                try:
                    with resumable_deltas(self.out.path / DELTA_CHECKPOINT, {"group": [c.case_id for c in group]}):
                        outcome = editor.apply([case.request for case in group]).without_updates()
                    if afresh:
                        self._check_sadr_applies()
                    peaks.end("edit")
                    edited, eval_seconds = self._evaluate(group)
                    peaks.end("evaluate")
                    memory = peaks.fields()
                    if self.cfg.save_edited:
                        self._save_edited(group, self.out.path / EDITED_MODELS / "_".join(str(c.case_id) for c in group))
                finally:
                    editor.load_state_dict(unedited_state)
                if group is groups[0]:
                    self._check_restored()
                missing = [(case, result) for case, result in zip(group, edited) if str(case.case_id) in pending]
                for case, result in missing:
                    self._write_row(self._row(case, result, unedited[str(case.case_id)], outcome, eval_seconds, len(group), memory))
                discard_deltas(self.out.path / DELTA_CHECKPOINT)
                progress.advance(len(missing))

    def _check_restored(self) -> None:
        """The unedited state the editor gave back restores the model: an editor whose `state_dict` holds no copy of a
        weight its `apply` wrote would otherwise leave every later case edited on top of the earlier ones, silently.
        Checked once a run, after its first group, by the weights' content hash that loading computed."""
        if model_fingerprint(self.loaded.model) != self.fingerprint:
            raise RuntimeError(
                f"editor={self.cfg.editor.name}: loading the state it gave before the first edit did not restore the "
                "model's weights; its state_dict must return copies (.clone()) of every weight its apply writes "
                "(Editor.layers names the down-projections the default state_dict copies)")

    def _parallel_single(self, editor: Editor, todo: list[EditCase], unedited: dict) -> None:
        """The single protocol, `editor.parallel_cases` cases at a time: each is edited alone into the unedited model,
        their δs optimised in shared forwards (`Editor.apply_each`), and the edited models evaluated together, each
        row through its own case's rank-one updates (`PerRowUpdates`), no weight written.

        Rows are written per case once its group is evaluated, so a resumed run redoes only the cases without a row.
        A row's seconds are its own work plus an even share of the work its group did together (the δ-optimisation,
        the evaluation): the rows' seconds add up to the group's. A group that runs out of GPU memory is redone in
        halves, and the rest of the run goes on at the width that fit: the cases are independent, so their results
        are those of any grouping.
        """
        width, pending = self.parallel_cases, list(todo)
        with Progress(len(todo), self.cfg.progress.bar) as progress:
            while pending:
                group = pending[:width]
                peaks = PhasePeaks(self.loaded.device)
                done = self._side_by_side(editor, group, peaks)
                if done is None:
                    width = len(group) // 2
                    log.warning("%d cases side by side ran out of GPU memory; going on with %d at a time "
                                "(editor.parallel_cases=%d starts there)", len(group), width, width)
                    release_unused_memory()
                    take_peak_memory(self.loaded.device)  # the failed attempt's peak is not the group's
                    continue
                outcomes, edited, eval_seconds = done
                peaks.end("evaluate")
                memory = peaks.fields()
                if len(pending) == len(todo):  # the first group: its rows are right only if each edit was undone
                    self._check_restored()
                for case, result, outcome in zip(group, edited, outcomes):
                    self._write_row(self._row(case, result, unedited[str(case.case_id)], outcome, eval_seconds, 1, memory))
                progress.advance(len(group))
                pending = pending[len(group):]

    def _side_by_side(self, editor: Editor, group: list[EditCase],
                      peaks: PhasePeaks) -> tuple[list[EditOutcome], list[dict], float] | None:
        """The group's outcomes, results and evaluation seconds per case; None if more than one case ran out of GPU
        memory (editing writes no weight and removes its hooks, so the model is as it was)."""
        try:
            outcomes = editor.apply_each([case.request for case in group])
            self._check_sadr_applies()
            peaks.end("edit")
            return (outcomes, *self._evaluate_each(group, outcomes))
        except torch.cuda.OutOfMemoryError:
            if len(group) == 1:
                raise
        return None  # outside the handler: the error's frames, and the tensors they hold, are released by now

    def _evaluate_each(self, cases: list[EditCase], outcomes: list[EditOutcome]) -> tuple[list[dict], float]:
        """Every case on its own edited model, all in shared forwards; seconds per case."""
        loaded = self.loaded
        start = time.perf_counter()
        with PerRowUpdates(loaded.model, loaded.adapter, [outcome.updates for outcome in outcomes]) as updates:
            results = evaluate_all(self.evaluators, loaded.model, loaded.tokenizer, loaded.adapter, cases, updates.rows)
        return results, (time.perf_counter() - start) / len(cases)

    def _sequential(self, editor: Editor, todo: list[EditCase], unedited: dict) -> None:
        """Edit every batch without restoring (checkpointing the editor's state), then evaluate all cases."""
        state_file = self.out.path / SEQUENTIAL_STATE
        unedited_state = editor.state_dict()
        peaks = PhasePeaks(self.loaded.device)
        try:
            state = _read_checkpoint(state_file) if state_file.is_file() else {"edited": [], "seconds": {}}
            # the editor's state is in the editor, and on disk: no copy of it is held between checkpoints
            editor.load_state_dict(state.pop("editor", unedited_state))
            edit_seconds = dict(state.get("seconds", {}))  # the edits' times before a resume (none in older checkpoints)
            diagnostics = state.setdefault("diagnostics", {})  # each edited request's batch's (none in older ones)
            group_sizes = state.setdefault("group_sizes", {})  # each edited request's batch's size (none in older ones)
            already = set(state["edited"])
            pending = [c for c in todo if str(c.case_id) not in already]
            if state["edited"]:
                log.info("sequential: resuming from %s, which holds %d edited request(s); %d to edit", state_file,
                         len(state["edited"]), len(pending))
            with Progress(len(pending), self.cfg.progress.bar) as progress:
                for group in case_groups(pending, self.cfg.editor.batch_size):
                    afresh = not self.out.deltas_kept()
                    with resumable_deltas(self.out.path / DELTA_CHECKPOINT,
                                          {"group": [c.case_id for c in group], "edited_before": len(state["edited"])}):
                        outcome = editor.apply([case.request for case in group]).without_updates()
                    if afresh:
                        self._check_sadr_applies()
                    for name, seconds in outcome.seconds.items():
                        edit_seconds[name] = edit_seconds.get(name, 0.0) + seconds
                    state["edited"] += [str(c.case_id) for c in group]
                    diagnostics.update({str(c.case_id): outcome.diagnostics for c in group})
                    group_sizes.update({str(c.case_id): len(group) for c in group})
                    state["seconds"] = dict(edit_seconds)
                    # under the run directory's lock
                    write_atomically({**state, "editor": editor.state_dict()}, state_file, TORCH)
                    discard_deltas(self.out.path / DELTA_CHECKPOINT)
                    progress.advance(len(group))
            peaks.end("edit")
            log.info("sequential: %d requests edited into the model; evaluating every case", len(state["edited"]))
            if self.cfg.save_edited:
                in_model = set(state["edited"])
                self._save_edited([c for c in self.dataset.cases if str(c.case_id) in in_model], self.out.path / EDITED_MODEL)
            edited, eval_seconds = self._evaluate(todo)
            peaks.end("evaluate")
            memory = peaks.fields()
        finally:
            editor.load_state_dict(unedited_state)
        for case, result in zip(todo, edited):
            # its batch's δ diagnostics, as a batch run's rows hold them
            outcome = EditOutcome(seconds=edit_seconds, diagnostics={**diagnostics.get(str(case.case_id), {}),
                                                                     "n_edits_in_model": len(state["edited"])})
            group_size = group_sizes.get(str(case.case_id), self.cfg.editor.batch_size)
            self._write_row(self._row(case, result, unedited[str(case.case_id)], outcome, eval_seconds, group_size,
                                      memory))
        self._check_restored()  # after the rows, which were scored on the model edited in sequence, as they should be

    def _finish(self) -> Path:
        cfg = self.cfg
        rows = [scored_fields(row) for row in self.out.iter_rows()]
        table = metric_table(rows)
        self.out.write_metrics(table)
        dataset = cfg.dataset.name
        if FORMATS[dataset].reads_target:  # zsRE-E of answers[0] and of alt are two protocols under one label
            dataset += f" (dataset.target={cfg.dataset.target.name})"
        print(f"\n{cfg.editor.name} on {cfg.model.name} / {dataset} ({_counted(len(rows), 'case')}, "
              f"protocol={cfg.editor.protocol.name}, sadr.lambda={cfg.sadr['lambda']}), prompt-level success ×100 ± 95% CI:")
        print(compact_table(table).to_string())
        print(f"\nresults: {self.out.path}")
        return self.out.path


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _read_checkpoint(state_file: Path) -> dict:
    """The sequential protocol's checkpoint (written whole and renamed, so a kill leaves the previous one), into host
    memory, wherever the run that wrote it ran: the editor copies its state onto the model's device."""
    try:
        return TORCH.load(state_file)
    except (EOFError, IndexError, pickle.UnpicklingError, RuntimeError, ValueError) as err:  # what damage raises
        raise DamagedFileError(f"the sequential checkpoint {state_file} cannot be read ({type(err).__name__}: {err}); "
                               "delete it, and a rerun of the same command redoes the sequential edits from the "
                               "start") from err


def run_experiment(cfg: DictConfig) -> Path:
    with RunDirectory(writable_dir(cfg.output_dir, "output_dir", "hydra.run.dir")).working():
        return Experiment(cfg).run()
