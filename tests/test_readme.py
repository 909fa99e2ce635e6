"""README's examples are checked against the code, so they cannot drift.

- every fenced block has a language: ``text`` (diagrams), ``yaml``, ``bash`` or ``python`` (run by
  tests/test_data_api.py);
- every YAML block parses and validates as a workflow (mmbatch/config.py);
- every bash block passes ``bash -n``; each ``mmbatch ...`` command in it parses with the real CLI parser,
  and ``mmbatch <command> --help`` runs (the real console script) for every command README shows;
- the workflow reference table in docs/workflow-reference.md is exactly what ``python -m mmbatch.config --reference``
  renders;
- every relative link in README and docs/ names a file that exists (and, with ``#anchor``, a heading in it).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mmbatch
from mmbatch.cli import build_parser
from mmbatch.config import REFERENCE_DOC, REFERENCE_END, REFERENCE_START, Workflow, workflow_from_dict, workflow_reference

ROOT = Path(mmbatch.__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks(lang: str | None = None) -> list[str]:
    found = [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(README.read_text())]
    return [body for tag, body in found if lang is None or tag == lang]


def mmbatch_commands(script: str) -> list[list[str]]:
    """The `mmbatch ...` invocations in a shell snippet (split on && ; |)."""
    out = []
    for part in re.split(r"&&|\|\||;|\|", script.replace("\\\n", " ")):
        words = shlex.split(part.strip(), comments=True)
        if words and words[0] == "mmbatch":
            out.append(words[1:])
    return out


def test_every_fenced_block_has_a_known_language():
    tags = [m.group(1).strip() for m in FENCE.finditer(README.read_text())]
    assert tags, "no code blocks found in README"
    assert set(tags) <= {"text", "yaml", "bash", "python"}, tags


def test_every_yaml_example_is_a_valid_workflow():
    yamls = blocks("yaml")
    assert yamls, "README has no YAML example"
    for body in yamls:
        data = yaml.safe_load(body)
        assert isinstance(data, dict) and set(data) <= set(Workflow.model_fields), body[:200]
        wf = workflow_from_dict(data)
        assert wf.name


def test_every_shell_block_is_valid_bash_and_its_mmbatch_commands_parse():
    scripts = blocks("bash")
    assert len(scripts) >= 2
    parser = build_parser()
    seen = []
    for body in scripts:
        r = subprocess.run(["bash", "-n"], input=body, text=True, capture_output=True)
        assert r.returncode == 0, (body, r.stderr)
        for args in mmbatch_commands(body):
            parser.parse_args(args)                # SystemExit (usage error) fails the test
            seen.append(args[0])
    assert "demo" in seen


def test_help_of_every_command_readme_shows_runs():
    commands = set(re.findall(r"`mmbatch (?:--verbose )?([a-z]+)", README.read_text()))
    commands |= {args[0] for body in blocks("bash") for args in mmbatch_commands(body)}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert commands <= set(sub.choices), commands - set(sub.choices)
    script = Path(sys.executable).parent / "mmbatch"
    for c in sorted(commands):
        r = subprocess.run([str(script), c, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "example:" in r.stdout, (c, r.stderr[-500:])


def test_workflow_reference_matches_the_model():
    assert REFERENCE_DOC == ROOT / "docs" / "workflow-reference.md"
    text = REFERENCE_DOC.read_text()
    assert REFERENCE_START in text and REFERENCE_END in text
    section = text[text.index(REFERENCE_START):text.index(REFERENCE_END) + len(REFERENCE_END)]
    assert section == workflow_reference(), "stale: python -m mmbatch.config --update docs/workflow-reference.md"
    for key in ("train.out", "train.name", "train.baselines", "splits.val_fraction", "output.path"):
        assert f"| `{key}` |" in section


@pytest.mark.parametrize("key", ["train.out", "train.name", "train.baselines", "splits.val_fraction"])
def test_keys_users_asked_about_are_documented_with_defaults(key):
    row = next(ln for ln in REFERENCE_DOC.read_text().splitlines() if ln.startswith(f"| `{key}` |"))
    assert row.count("|") >= 5 and row.split("|")[2].strip()       # a default column


def test_readme_links_to_the_workflow_reference():
    assert "](docs/workflow-reference.md)" in README.read_text()


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", md.read_text())
    heads = re.findall(r"^#+ +(.+?) *$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for md in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(FENCE.sub("", md.read_text())):
            if re.match(r"[a-z]+:", target):                       # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
