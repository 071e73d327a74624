"""The command lines the documentation shows still run as written: their keys, groups and options exist.

README.md and docs/*.md show `sadr-run` commands and sweeps and `sadr` subcommands, in code blocks and in backticks.
A renamed key, group option or CLI option leaves a reader with a command that fails at once. These tests compose
each `sadr-run` command (each job of a `-m` sweep, as Hydra's basic sweeper makes them) with the run's own
validation, and parse each `sadr` command line with its click command, without running either.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import typer
from hydra.core.override_parser.overrides_parser import OverridesParser

from sadr.cli.main import app
from sadr.cli.sweep import folder_varied_by_the_sweep, sweep_jobs as jobs_of_the_sweep
from sadr.conf.advice import misspelt_override
from sadr.conf.registry import compose_config, sadr_configs
from sadr.conf.validation import ConfigError
from sadr.errors import MissingInputError
from sadr.models.loading import check_local_source
from tests.test_docs import CODE_SPAN, FENCE, DOCUMENTS, ROOT, prose

# A command line, after an optional `$ ` prompt and environment assignments (`HYDRA_FULL_ERROR=1 sadr-run ...`).
_COMMAND = re.compile(r"^(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(sadr-run|sadr)(?=\s|$)(.*)$", re.DOTALL)
# `<sweep>`, `<memit run>`, `<date>_<time>` stand for a run folder: any path parses as one.
_PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
# The README's examples of mistakes ("Mistakes"): each must fail; it shows what sadr-run prints for the one the run's
# own checks refuse (Hydra refuses the other two with its own message).
MISTAKES = {("editor=rmoe",), ("sadr.lambda=abc",), ("sadr.lambda=-1",)}


def _command_lines(text: str):
    """Each line of the code blocks (a trailing backslash joins the next) and each code span of the prose."""
    for fence in FENCE.finditer(text):
        yield from re.sub(r"\\\n\s*", " ", fence.group(0)).splitlines()[1:-1]
    for span in CODE_SPAN.finditer(prose(text)):
        yield " ".join(span.group(2).split())


def documented_commands(document: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(the line as written, `sadr-run` or `sadr`, its arguments without a trailing comment) of each command."""
    found = []
    for line in _command_lines(document.read_text(encoding="utf-8")):
        match = _COMMAND.match(line.strip())
        if match:
            arguments = shlex.split(_PLACEHOLDER.sub("runs/run", match[2]), comments=True)
            found.append((line.strip(), match[1], tuple(arguments)))
    return found


COMMANDS = [(document, *command) for document in DOCUMENTS for command in documented_commands(document)]


def _flags() -> argparse.ArgumentParser:
    """Hydra's command-line flags that the documentation uses; any other flag is refused (exits)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("-m", "--multirun", action="store_true")
    parser.add_argument("--cfg", choices=["job", "hydra", "all"])
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("overrides", nargs="*")
    return parser


def _with_own_model_folder(override: str, model_folder: Path) -> str:
    """A model folder given as a path is the reader's own (/models/my-llama, runs/seq/edited_model), which the run
    checks exists: the test's folder stands in for it. A hub id, which only loading checks, is left as it is."""
    key, _, source = override.partition("=")
    if key != "model.source":
        return override
    try:
        check_local_source(source)
    except MissingInputError:
        return f"model.source={model_folder}"
    return override


def sweep_jobs(arguments: tuple[str, ...], model_folder: Path) -> list[list[str]]:
    """The overrides of each job `sadr-run arguments` runs: one job, or each of a `-m` sweep's, as `sadr-run` expands
    them. A sweep that `sadr-run` refuses for its folder raises ConfigError."""
    args = _flags().parse_args(list(arguments))
    overrides = [_with_own_model_folder(o, model_folder) for o in args.overrides]
    if not args.multirun:
        return [overrides]
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    launching = compose_config(fixed, checked=False, hydra=True)
    launching.hydra.overrides.task = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    refused = folder_varied_by_the_sweep(launching)
    if refused:
        raise ConfigError(refused)
    with sadr_configs():
        return jobs_of_the_sweep(launching)


def sadr_run_problems(model_folder: Path) -> list[str]:
    """Each documented `sadr-run` command (the README's mistakes aside) whose flags or jobs do not compose."""
    problems, composed = [], set()
    for document, line, program, arguments in COMMANDS:
        # `HYDRA_FULL_ERROR=1 sadr-run ...`: `...` stands for any command, so there is nothing to compose.
        if program != "sadr-run" or arguments in MISTAKES or arguments == ("...",):
            continue
        where = f"{document.relative_to(ROOT)}: {line!r}"
        try:
            jobs = sweep_jobs(arguments, model_folder)
        except (argparse.ArgumentError, SystemExit):  # SystemExit: argparse's own exit on an unknown flag
            problems.append(f"{where}: Hydra does not accept its flags")
            continue
        except Exception as err:  # a sweep's own config (its experiment=, its fixed keys) does not compose
            problems.append(f"{where}: {misspelt_override(list(arguments)) or f'{type(err).__name__}: {err}'}")
            continue
        failed = []
        for job in jobs:
            if tuple(job) in composed:
                continue
            try:
                compose_config(job, checked=True, hydra=True)
            except Exception as err:  # whatever stops the run stops the reader: every one is a problem to list
                # sadr-run's own line for a misspelt key (Hydra's advice to add '+' would not help)
                failed.append(f"job {' '.join(job)}: {misspelt_override(job) or f'{type(err).__name__}: {err}'}")
            composed.add(tuple(job))
        if failed:
            more = f" (and {len(failed) - 1} more of its {len(jobs)} jobs)" if len(failed) > 1 else ""
            problems.append(f"{where}: {failed[0]}{more}")
    return problems


def sadr_problems() -> list[str]:
    """Each documented `sadr` command line whose subcommand, options or arguments its click command refuses.
    `sadr` or a subcommand named alone (`sadr compare`, in prose) is checked only for its existence."""
    commands = typer.main.get_command(app).commands
    problems = []
    for document, line, program, arguments in COMMANDS:
        if program != "sadr" or not arguments:
            continue
        where = f"{document.relative_to(ROOT)}: {line!r}"
        name, *rest = arguments
        if name not in commands:
            problems.append(f"{where}: sadr has no subcommand {name!r} (it has {', '.join(commands)})")
        elif rest:
            try:
                commands[name].make_context(name, rest)
            except typer.TyperException as err:  # typer's own click raises these (NoSuchOption, MissingParameter, ...)
                problems.append(f"{where}: {err}")
    return problems


def test_every_documented_sadr_run_command_composes_and_passes_the_runs_checks(tmp_path):
    problems = sadr_run_problems(tmp_path)
    assert not problems, "documented sadr-run commands that would not run:\n" + "\n".join(problems)


def test_every_documented_sadr_command_line_parses():
    problems = sadr_problems()
    assert not problems, "documented sadr command lines that would not parse:\n" + "\n".join(problems)


def test_the_documented_mistakes_fail_as_the_readme_shows():
    """The README's examples of mistakes are found and fail; one the run's checks refuse prints what the README shows."""
    documented = {arguments for _, _, program, arguments in COMMANDS if program == "sadr-run"}
    assert MISTAKES <= documented
    for arguments in MISTAKES:
        try:
            compose_config(list(arguments), checked=True)
        except ConfigError as err:
            assert f"$ sadr-run {arguments[0]}\nerror: {err}\n" in (ROOT / "README.md").read_text(encoding="utf-8")
        except Exception:
            continue  # Hydra's own refusal: sadr-run prints Hydra's message
        else:
            raise AssertionError(f"sadr-run {' '.join(arguments)} composed, but the README shows it failing")


def test_the_parser_finds_the_documented_commands():
    """The checks above read what they should: commands from code blocks, continued lines, backticks and docs/."""
    found = {(program, arguments) for _, _, program, arguments in COMMANDS}
    assert len([command for command in COMMANDS if command[2] == "sadr-run"]) >= 40
    assert ("sadr-run", ("-m", "editor=rome,memit,pmet", "sadr.lambda=0,0.01")) in found
    assert ("sadr-run", ("-m", "experiment=sadr_comparison", "editor=rome,memit,pmet", "dataset.limit=null",
                         "dataset.case_ids=[20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39]")) in found
    assert ("sadr-run", ("editor.parallel_cases=8",)) in found  # a code span
    assert ("sadr-run", ("editor=memit",)) in found  # docs/editor_defaults.md
    assert ("sadr", ("compare", "runs/run", "runs/run")) in found  # `<memit run> <alphaedit run>`, comment dropped
    assert ("sadr", ("summarize", "runs/cf")) in found
