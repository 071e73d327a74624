"""The repository's documentation names only files (and tests) that exist in it.

README.md and docs/*.md cite modules, tests and figures in backticks (`sadr/evaluation/paired.py`,
`tests/test_paired.py::test_sign_test_matches_hand_computed_binomial_tails`) and as Markdown links. A cited file that
was renamed or lives outside the repository leaves a reader of a fresh clone with a dead reference; these tests list
every such reference. Standard library only, except the check that every config key the documents cite
(`editor.rome_update`) exists, which composes the config.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIXES = ("docs/", "sadr/", "benchmarks/", "tests/", "tools/")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A repository path inside a code span: it starts with one of PREFIXES, not in the middle of a longer path or name.
_PATH = re.compile(r"(?<![\w./-])((?:%s)[^\s`'\",;()]*)" % "|".join(re.escape(p) for p in PREFIXES))
# docs/fidelity.md's tables cite tests by file name alone (`test_rome.py::test_...`): those are read under tests/.
_BARE_TEST_FILE = re.compile(r"(?<![\w./-])(test_\w+\.py(?:::[^\s`'\",;()]*)?)")
_GLOB_OR_PLACEHOLDER = re.compile(r"[*?{}\[\]<>]|\.\.\.")


def prose(text: str) -> str:
    """The text without fenced code blocks (commands and output, not references)."""
    return FENCE.sub("", text)


def _reference(raw: str) -> tuple[str, str | None] | None:
    """(file part, test name or None) of a cited path; None for globs and placeholders."""
    raw = raw.rstrip(".:")
    file_part, _, test = raw.partition("::")
    if not file_part or _GLOB_OR_PLACEHOLDER.search(file_part) or "<" in test:
        return None
    test_name = re.sub(r"\[.*\]$", "", test.split("::")[-1]) if test else None  # a parametrized id is stripped
    return file_part, test_name or None


def cited_paths(document: Path) -> list[tuple[str, str, str | None]]:
    """(what was written, path relative to ROOT, test name or None) of every repository path the document cites.

    Code spans are read from the repository root (a bare `test_x.py` from tests/); relative Markdown link targets
    from the document's folder.
    """
    text = prose(document.read_text(encoding="utf-8"))
    found = []
    for span in CODE_SPAN.finditer(text):
        for raw in _PATH.findall(span.group(2)):
            reference = _reference(raw)
            if reference:
                found.append((raw, reference[0], reference[1]))
        for raw in _BARE_TEST_FILE.findall(span.group(2)):
            reference = _reference(raw)
            if reference:
                found.append((raw, f"tests/{reference[0]}", reference[1]))
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith(("#", "/")):
            continue  # a URL, an anchor in the same page, or an absolute path
        reference = _reference(target.split("#")[0])
        if reference:
            resolved = (document.parent / reference[0]).resolve()
            try:
                relative = resolved.relative_to(ROOT).as_posix()
            except ValueError:
                relative = target  # above the repository: cannot exist in a clone
            found.append((target, relative, reference[1]))
    return found


def broken_references(document: Path) -> list[str]:
    problems = []
    for written, relative, test in cited_paths(document):
        path = ROOT / relative
        where = f"{document.relative_to(ROOT)}: {written!r}"
        if relative.startswith("..") or not path.exists():
            problems.append(f"{where}: no such file or folder in the repository")
        elif test is not None:
            source = path.read_text(encoding="utf-8") if path.is_file() else ""
            if not re.search(rf"^\s*(?:async\s+)?def {re.escape(test)}\(", source, re.MULTILINE):
                problems.append(f"{where}: {relative} has no `def {test}`")
    return problems


def test_every_repository_path_and_test_the_documentation_cites_exists():
    problems = [problem for document in DOCUMENTS for problem in broken_references(document)]
    assert not problems, "broken references in the documentation:\n" + "\n".join(problems)


def test_the_documentation_cites_repository_paths_and_tests():
    """The check above reads what it should: README and docs/metrics.md cite files and tests, which it finds."""
    readme = {relative for _, relative, _ in cited_paths(ROOT / "README.md")}
    assert "docs/metrics.md" in readme
    fidelity = cited_paths(ROOT / "docs" / "fidelity.md")
    assert any(relative == "tests/test_rome.py" and test for _, relative, test in fidelity)
    metrics = cited_paths(ROOT / "docs" / "metrics.md")
    assert ("docs/fidelity.md", None) in {(relative, test) for _, relative, test in metrics}
    assert any(test == "test_format_runs_with_every_metric_that_applies" for _, _, test in metrics)


def test_globs_placeholders_and_parametrized_ids_are_read_as_intended(tmp_path, monkeypatch):
    document = tmp_path / "docs" / "page.md"
    document.parent.mkdir()
    document.write_text(
        "`sadr/conf/hparams/{rome,memit}_x.yaml` `outputs/<date>` `tests/test_*.py` `docs/<name>.md`\n"
        "`tests/test_docs.py::test_globs_placeholders_and_parametrized_ids_are_read_as_intended[one]`\n"
        "`test_docs.py::test_no_such_test` `sadr/no_such_module.py`, `python -m sadr/cli` [page](page.md)\n"
        "[missing](missing.md) [site](https://example.org/sadr/x.py) [anchor](#metrics)\n"
        "```\nsadr report tests/not_a_reference.py\n```\n",
        encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_docs.py").write_text(
        "def test_globs_placeholders_and_parametrized_ids_are_read_as_intended():\n    pass\n", encoding="utf-8")
    (tmp_path / "sadr" / "cli").mkdir(parents=True)
    problems = broken_references(document)
    assert len(problems) == 3, problems
    assert "has no `def test_no_such_test`" in problems[0]
    assert "'sadr/no_such_module.py'" in problems[1] and "'missing.md'" in problems[2]


# A config key in a code span: `editor.rome_update: paper`, `model.stats.hub_sample=first`, `sadr.lambda`.
_CONFIG_KEY = re.compile(r"(?<![\w./-])((?:editor|eval|model|dataset|sadr|progress)(?:\.\w+)+)")
# spans that read as keys but are not meant as settings
NOT_KEYS = {"model.safetensors": "a file a saved model holds", "sadr.lamda": "the README's example of a misspelt key"}


def cited_config_keys(document: Path) -> set[str]:
    keys = set()
    for span in CODE_SPAN.finditer(prose(document.read_text(encoding="utf-8"))):
        keys.update(_CONFIG_KEY.findall(span.group(2)))
    return keys - set(NOT_KEYS)


def test_every_config_key_the_documentation_cites_exists():
    """The documents name settings by their dotted keys; each must be a key of the composed config for some editor (a
    key renamed or removed leaves a page that tells the reader to set something `sadr-run` rejects). Module paths such
    as `sadr.evaluation.summary` are not keys and are skipped."""
    from omegaconf import OmegaConf

    from sadr.conf.registry import compose_config
    from sadr.editors.registry import EDITORS

    configs = [OmegaConf.to_container(compose_config([f"editor={name}"])) for name in EDITORS]
    modules = {path.stem for path in (ROOT / "sadr").iterdir() if path.is_dir() or path.suffix == ".py"}

    def exists(key: str) -> bool:
        head, *rest = key.split(".")
        for config in configs:
            node = config.get(head)
            for part in rest:
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return True
        return head == "sadr" and rest[0] in modules

    problems = [f"{document.relative_to(ROOT)}: `{key}`"
                for document in DOCUMENTS for key in sorted(cited_config_keys(document)) if not exists(key)]
    assert not problems, "config keys the documentation cites that no composed config has:\n" + "\n".join(problems)
