"""``--help`` says what every option means, once, and docs/config.md is the same reference."""

from __future__ import annotations

import argparse
import re
import runpy
from pathlib import Path

from sane_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, name: str = "sane-ray"):
    """Every (sub)command's parser, depth first, with its command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def test_every_option_of_every_job_is_described_once():
    seen_jobs = set()
    for name, parser in _parsers(build_parser()):
        seen_jobs.add(name)
        options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        for action in options:
            text = (action.help or "").strip()
            assert text and not re.fullmatch(r"\(?default: .*\)?", text), \
                f"{name} {action.option_strings[-1]}: no description (help {action.help!r})"
        dests = [a.dest for a in options]
        twice = sorted({d for d in dests if dests.count(d) > 1})
        assert not twice, f"{name}: {twice[0]!r} is listed more than once"
    assert {"sane-ray pretrain", "sane-ray sample", "sane-ray tune", "sane-ray probe", "sane-ray make-zoo"} <= seen_jobs


def test_an_aliased_key_is_one_entry_with_its_short_flag():
    text = dict(_parsers(build_parser()))["sane-ray pretrain"].format_help()
    assert "--epochs, --train.epochs VALUE" in text
    assert "Training epochs" in text.split("--epochs, --train.epochs VALUE")[1].split("--")[0]
    assert text.count("--train.epochs") == 1


def test_docs_config_md_is_what_the_generator_writes():
    render = runpy.run_path(str(ROOT / "tools" / "config_doc.py"))["render"]
    assert (ROOT / "docs" / "config.md").read_text() == render(), \
        "docs/config.md is stale: run python tools/config_doc.py"
