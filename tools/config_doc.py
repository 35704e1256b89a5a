"""The config reference, generated from the jobs' config dataclasses: ``python tools/config_doc.py``.

Writes ``docs/config.md``: per job, per section, every key with its type, default, short flags
and description, read by :func:`sane_ray.config.config_keys` (what ``--help`` prints), so the
reference cannot drift from the code. ``tests/test_cli_help.py`` fails when the file differs
from :func:`render`.
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, wherever the script is run from

from sane_ray.cli import config_jobs  # noqa: E402
from sane_ray.config import ConfigKey, config_keys  # noqa: E402

DOC = ROOT / "docs" / "config.md"

HEADER = """# Config reference

Generated from the config dataclasses by `python tools/config_doc.py`; edit a field's docstring,
not this file. Every key is a flag `--key VALUE` of its job (values are YAML: `3e-4`, `true`,
`[a, b]`) and a key of the YAML or TOML file given with `--config FILE`, nested by section
(`train: {optim: {lr: 3e-4}}`); flags override the file. Defaults are the job's own, as JSON.
`sane-ray JOB --help` prints the same descriptions, and the job's other flags.
"""


def render() -> str:
    """The whole of docs/config.md."""
    out = [HEADER]
    for job, (cls, aliases) in config_jobs().items():
        out += [f"## `sane-ray {job}`", "", _summary(cls), ""]
        sections: dict[str, list[ConfigKey]] = {"": []}  # top-level keys first
        for k in config_keys(cls, aliases):
            sections.setdefault(k.key.rpartition(".")[0], []).append(k)
        for section, keys in sections.items():
            if not keys:
                continue
            if section:
                out += [f"### `{section}`", "", _summary(_section_class(cls, section)), ""]
            out += ["| key | type | default | flags | description |", "|---|---|---|---|---|"]
            out += [_row(k) for k in keys] + [""]
    return "\n".join(out)


def _summary(cls: type) -> str:
    return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def _section_class(cls: type, section: str) -> type:
    for name in section.split("."):
        cls = typing.get_type_hints(cls)[name]
    return cls


def _row(k: ConfigKey) -> str:
    flags = ", ".join(f"`--{a}`" for a in k.aliases)
    cells = [f"`{k.key}`", f"`{k.type}`", f"`{k.default}`", flags, k.help.replace("<", "&lt;")]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC.relative_to(ROOT)}")
