"""The scripts share no module: a helper two of them need is copied, marked `# Copied from generate.first_line`
(transformers' convention, `with Old->New` for a renamed word), and must stay identical to its source."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^# Copied from ([\w.]+)\.(\w+)(?: with (.+))?$")
SCRIPTS = sorted([*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")])


def definitions(path: Path) -> dict:
    """Each top-level function or class of `path`: (source with its decorators, the line before it)."""
    text = path.read_text()
    lines = text.splitlines()
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)]) - 1
            found[node.name] = ("\n".join(lines[start : node.end_lineno]), lines[start - 1] if start else "")
    return found


def copies() -> list:
    marked = []
    for path in SCRIPTS:
        for name, (source, above) in definitions(path).items():
            if match := MARKER.match(above.strip()):
                marked.append(pytest.param(path, name, source, *match.groups(), id=f"{path.name}:{name}"))
    return marked


def apply(replacements: str | None, text: str) -> str:
    for pair in (replacements or "").split(","):
        if pair.strip():
            old, new = (part.strip() for part in pair.split("->"))
            text = text.replace(old, new)
    return text


@pytest.mark.parametrize(("path", "name", "source", "module", "original", "replacements"), copies())
def test_a_copied_helper_is_identical_to_its_source(path, name, source, module, original, replacements):
    source_file = ROOT / (module.replace(".", "/") + ".py")
    assert source_file.is_file(), f"{path.name}:{name} names {module}, which is no script here"
    assert source_file != path, f"{path.name}:{name} is marked as a copy of itself"
    originals = definitions(source_file)
    assert original in originals, f"{path.name}:{name} is copied from {module}.{original}, which is not there"
    expected = apply(replacements, originals[original][0])
    assert name == original or name == apply(replacements, original)
    assert source == expected, f"{path.name}:{name} differs from {module}.{original}: copy it again"


def test_copies_are_found():
    """The check above is only as good as its markers: the helpers every script shares are marked."""
    marked = {(param.values[0].name, param.values[1]) for param in copies()}
    assert ("finetune_lora.py", "first_line") in marked and ("download.py", "first_line") in marked
