"""The docs stay true to the code: README.md and docs/tour.md name pictures that exist, commands
that parse, and functions and files that exist (a rename must update the tour)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "tour.md"]
CODE_DIRS = ("fast", "ref", "conformance", "examples")


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_pictures_exist(doc):
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _text(doc))
    for image in images:
        path = doc.parent / image
        assert path.is_file(), f"{doc.name} shows {image}, which does not exist"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{image} is not a drawn PNG"
    if doc.name == "tour.md":
        assert len(images) >= 5


def _commands(module: str) -> list[list[str]]:
    found = []
    for doc in DOCS:
        for line in _text(doc).splitlines():
            m = re.search(rf"\.venv/bin/python -m {re.escape(module)}( [^`#]*)?", line)
            if m and not line.rstrip().endswith("\\"):
                found.append(shlex.split(m.group(1) or ""))
    return found


def test_trace_commands_parse(monkeypatch):
    from fast.trace.__main__ import build_parser

    monkeypatch.syspath_prepend(str(ROOT))  # `python -m` from the root puts it on sys.path
    commands = _commands("fast.trace")
    assert len(commands) >= 8
    for argv in commands:
        build_parser().parse_args(argv)  # exits (SystemExit) on a bad flag or policy


def test_conformance_commands_parse(monkeypatch):
    from conformance.__main__ import parse_args

    monkeypatch.syspath_prepend(str(ROOT))
    commands = _commands("conformance")
    assert any("--policy" in argv for argv in commands)
    for argv in commands:
        parse_args(argv)


def _definitions() -> set[str]:
    """Functions, classes, and fields or attributes given a value or a type somewhere."""
    names = set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            code = path.read_text(encoding="utf-8")
            names |= set(re.findall(r"^\s*(?:def|class)\s+(\w+)", code, re.M))
            names |= set(re.findall(r"^\s*(?:self\.)?(\w+)\s*(?::[^=\n]+)?=(?!=)", code, re.M))
            names |= set(re.findall(r"^\s+(\w+)\s*:\s*[\w\[]", code, re.M))  # dataclass fields
    return names


def test_tour_names_only_code_that_exists():
    text = _text(ROOT / "docs" / "tour.md")
    for path in set(re.findall(r"`((?:fast|ref|conformance|examples|benchmarks)/[\w/]+\.py)`", text)):
        assert (ROOT / path).is_file(), f"the tour names {path}, which does not exist"
    defined = _definitions()
    # `Class.method`, `snake_name` or `CamelName` in backticks: the last part must be defined
    for name in re.findall(r"`((?:[A-Z]\w*\.)?_?[a-z]\w*_\w*|[A-Z]\w*\.\w+|[A-Z][a-z]+[A-Z]\w*)`", text):
        last = name.split(".")[-1]
        assert last in defined, f"the tour names `{name}`, but nothing defines {last}"
