"""One CLI: one flag per concept (old spellings still accepted), --version, defaults in every --help,
--json where a command prints a summary, and one exit code per situation (subq.exit_codes)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import subq
from subq import exit_codes
from subq.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its name, e.g. "store stats"."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return out


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def test_version():
    out = subprocess.run([sys.executable, "-m", "subq.cli", "--version"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert out.strip() == f"subq {subq.__version__}"


def test_every_help_shows_the_defaults():
    subs = _subparsers(build_parser())
    assert {"collect", "train", "serve", "llm-server", "eval", "pipeline", "store stats"} <= set(subs)
    for name, p in subs.items():
        for a in p._actions:
            shown = (a.option_strings and a.help != argparse.SUPPRESS and a.default != argparse.SUPPRESS
                     and a.default not in (None, False, [], {}))
            if shown and not isinstance(a.default, bool):
                assert "%(default)" in (a.help or ""), f"subq {name} {a.option_strings[0]}: no default in --help"
    text = " ".join(subs["collect"].format_help().split())  # unwrapped
    assert "(default: 120.0)" in text and "(default: gsm8k:train[:8])" in text
    assert "(default: embedded:smollm2-135m-instruct)" in " ".join(subs["train"].format_help().split())


def test_one_flag_per_concept_across_commands():
    subs = _subparsers(build_parser())
    for cmd in ("train", "serve", "llm-server"):  # the model to load
        assert "--model" in _options(subs[cmd])
    for cmd in ("train", "serve", "llm-server", "eval"):  # GPUs per worker / replica
        assert "--num-gpus" in _options(subs[cmd])
    for cmd in ("collect", "serve", "llm-server"):  # a reply's token cap
        assert "--max-tokens" in _options(subs[cmd])
    for cmd in ("collect", "train", "eval", "pipeline"):  # commands with progress bars
        assert "--no-progress" in _options(subs[cmd])
    for cmd in ("collect", "train", "eval", "eval-rescore", "pipeline", "import", "export", "store stats",
                "store history", "store compact"):  # commands that print a summary
        assert "--json" in _options(subs[cmd]), cmd
    timeouts = {cmd: subs[cmd].parse_args([]).timeout for cmd in ("collect", "eval")}
    assert timeouts == {"collect": 120.0, "eval": 120.0}
    hidden = {"--init", "--use-gpu", "--checkpoint", "--max-new-tokens", "--serve-num-gpus"}
    for name, p in subs.items():
        assert not hidden & _options(p), f"subq {name} shows an old spelling in --help"


@pytest.mark.parametrize("argv, dest, value", [
    (["train", "--init", "tiny-random:llama"], "init", "tiny-random:llama"),
    (["train", "--model", "tiny-random:llama"], "init", "tiny-random:llama"),
    (["train", "--use-gpu"], "num_gpus", 1.0),
    (["train"], "num_gpus", 0.0),
    (["serve", "--checkpoint", "runs/x/final"], "model", "runs/x/final"),
    (["serve", "--max-new-tokens", "7"], "max_new_tokens", 7),
    (["serve", "--max-tokens", "7"], "max_new_tokens", 7),
    (["llm-server", "--max-new-tokens", "9"], "max_new_tokens", 9),
    (["llm-server"], "max_new_tokens", 1024),
    (["eval", "--serve-num-gpus", "0.5"], "num_gpus", 0.5),
    (["eval"], "num_gpus", 0.0),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_old_spellings_are_still_accepted(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


@pytest.mark.parametrize("argv", [
    ["store", "stats"], ["store", "stats", "--json"], ["store", "history"], ["store", "compact"],
    ["export", "out.json"], ["train", "--model", "tiny-random:llama"],
], ids=" ".join)
def test_a_store_that_does_not_exist_is_bad_input(tmp_path, capsys, argv):
    typo = tmp_path / "stroe"
    rc = main([*argv, "--store", str(typo)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == exit_codes.BAD_INPUT
    assert len(err) == 1 and err[0].startswith("subq: error: no store at") and str(typo) in err[0], err
    assert not typo.exists()


def test_store_stats_json_on_an_existing_store(tmp_path, capsys):
    from subq.data_store.store import Store

    from tests.test_store import _problem

    Store(str(tmp_path / "s")).append("problems", [_problem(0)])
    assert main(["store", "stats", "--store", str(tmp_path / "s"), "--json"]) == exit_codes.DONE
    assert json.loads(capsys.readouterr().out)["tables"]["problems"] == 1


def test_train_num_gpus_is_per_worker(tmp_path, capsys):
    assert main(["train", "--num-gpus", "2", "--store", str(tmp_path)]) == exit_codes.BAD_INPUT
    assert "--num-workers" in capsys.readouterr().err


def test_exit_code_table_is_documented_once():
    doc = (ROOT / "docs" / "cli.md").read_text()
    for code in exit_codes.TABLE:
        assert f"| {code} |" in doc
