"""The user docs against rot: links resolve, named configs exist, shown commands parse, YAML examples load.

Cheap (no Ray, no models): it reads Markdown files and runs the CLI's argparse parser and the config
loader on what the docs show.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from subq.cli import build_parser
from subq.cli_eval import rewrite_argv
from subq.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md",
               ROOT / "cluster" / "README.md"])
MAX_README_LINES = 350
# Docs that other work is writing right now; a link to one is excused only while the file is missing.
PENDING: set[Path] = set()  # docs announced before they land (none now)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a link inside one is an example, not a link)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _prose(path.read_text()), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc: Path) -> None:
    assert doc.is_file(), f"{_rel(doc)} is missing"
    broken = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            if dest not in PENDING:
                broken.append(target)
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{_rel(doc)}: links that resolve to nothing: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_named_configs_exist(doc: Path) -> None:
    named = set(re.findall(r"\bconfigs/[\w.-]+\.ya?ml\b", doc.read_text()))
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"{_rel(doc)} names configs that do not exist: {missing}"


def test_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def _shell_commands(text: str) -> list[str]:
    """The lines of every bash block, with backslash continuations joined."""
    out: list[str] = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "console", ""):
            out.extend(body.replace("\\\n", " ").splitlines())
    return out


def _subq_invocations(line: str) -> list[list[str]]:
    """Each ``subq ...`` (or ``.venv/bin/subq ...``) command on a shell line, as argv after ``subq``."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in an example is caught by the parse below as a mismatch
        words = line.split()
    found, i = [], 0
    while i < len(words):
        if Path(words[i]).name == "subq" and (i == 0 or words[i - 1] in ("&&", "||", ";", "--", "|")):
            j = i + 1
            while j < len(words) and words[j] not in ("&&", "||", ";", "|"):
                j += 1
            found.append(words[i + 1:j])
            i = j
        else:
            i += 1
    return found


def _subcommands() -> dict[str, set[str]]:
    """{command: its own subcommands} from the real parser."""
    import argparse

    def choices(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: set(choices(sub)) for name, sub in choices(build_parser()).items()}


def test_readme_commands_exist_in_the_cli() -> None:
    """Every ``subq <command>`` the README shows, in code blocks and inline, is a real command; a whole
    command line in a code block parses with the real parser (its flags exist, its values fit)."""
    text = README.read_text()
    commands = _subcommands()
    shown = re.findall(r"`(?:\.venv/bin/)?subq ([a-z][\w-]*)(?: ([a-z][\w-]*))?", text)
    bad = []
    for cmd, sub in shown:
        cmd, *rest = rewrite_argv([cmd, sub] if sub else [cmd])
        if cmd not in commands:
            bad.append(cmd)
        elif commands[cmd] and rest and rest[0] not in commands[cmd]:
            bad.append(f"{cmd} {rest[0]}")
    assert not bad, f"README.md shows commands the CLI does not have: {bad}"
    lines = [argv for line in _shell_commands(text) for argv in _subq_invocations(line)]
    assert len(lines) >= 5, "expected the README to show subq commands in code blocks"
    for argv in lines:
        if any("$" in w for w in argv):  # a shell variable: only the command name can be checked
            assert argv and rewrite_argv(argv)[0] in commands, argv
            continue
        try:
            build_parser().parse_args(rewrite_argv(list(argv)))
        except SystemExit:
            pytest.fail(f"README.md: `subq {' '.join(argv)}` does not parse")


@pytest.mark.parametrize("doc", [README, *(ROOT / "docs").glob("*.md")], ids=_rel)
def test_doc_commands_are_real(doc: Path) -> None:
    """The detailed docs' command names exist (their flags are checked where the README shows them)."""
    commands = _subcommands()
    bad = {argv[0] for line in _shell_commands(doc.read_text()) for argv in _subq_invocations(line)
           if argv and rewrite_argv(argv)[0] not in commands}
    assert not bad, f"{_rel(doc)} shows commands the CLI does not have: {sorted(bad)}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_yaml_examples_load(doc: Path, tmp_path: Path) -> None:
    """A pipeline-config fragment a doc shows is accepted by the config loader (keys, types)."""
    for i, (lang, body) in enumerate(FENCE.findall(doc.read_text())):
        if lang not in ("yaml", "yml"):
            continue
        path = tmp_path / f"example{i}.yaml"
        path.write_text(body)
        try:
            load_config(str(path))
        except ConfigError as e:
            pytest.fail(f"{_rel(doc)}: YAML example {i} is not a valid config: {e}")


def test_stale_statements_stay_gone() -> None:
    """The statements a user found wrong in an earlier README stay out of the docs."""
    text = "\n".join(d.read_text() for d in DOCS if d.is_file())
    assert '"model": "ilql"' not in text  # the served name is the checkpoint directory's: "final"
    assert "eval_filtered_bc.jsonl" not in text  # not shipped
    assert "train.use_gpu" not in text and "train.num_workers" not in text  # train.defaults.*
    assert "shared folder" not in text and "DESIGN.md" not in text  # users do not have it
    unquoted = re.findall(r"(?<![\"'\w:=])(?:gsm8k|svamp|aqua):\w+\[[^\]]*\](?![\"'])",
                          "\n".join(_shell_commands(text)))
    assert not unquoted, f"dataset specs with brackets must be quoted in shell examples: {unquoted}"
