"""The README's "Layout of the code" is true to the tree: every module and C++ file of the
package is named there, and everything named there exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree() -> list[Path]:
    """The checkout's files and folders: no build outputs, nothing hidden (.git, .whl)."""
    return [p for p in ROOT.rglob("*")
            if not any(part.startswith(".") or part == "build"
                       for part in p.relative_to(ROOT).parts)]


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def words(block: str) -> set[str]:
    return set(re.findall(r"[\w.]+", block))


def test_every_python_module_is_named():
    named = words(layout_block())
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "refit_engine").rglob("*.py"))
               if p.name != "__init__.py" and p.name not in named]
    assert not missing, f"modules the README's layout section does not name: {missing}"


def test_every_cpp_file_and_folder_is_named():
    named = words(layout_block())
    missing = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        name = path.name if path.is_dir() else path.stem
        if name not in named and path.name not in named:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"C++ files or folders the README's layout section does not name: {missing}"


def test_every_named_file_exists():
    block = layout_block()
    files = {p.name for p in tree()}
    named = {w for w in words(block) if re.fullmatch(r"\w+\.(py|h|sh|md)", w)}
    assert named, "no file names found in the layout section"
    assert not sorted(named - files), f"named in the README but not in the tree: {sorted(named - files)}"


def test_every_named_folder_exists():
    # Folders are named at the start of a tree line ("csrc/", "transport/nccl/",
    # "common/check.h"); prose in the descriptions ("pack/unpack", "TP/PP") is not a path.
    folders = {p.name for p in tree() if p.is_dir()}
    named = set()
    for line in layout_block().splitlines():
        first = line.strip().split(" ", 1)[0]
        if "/" in first and re.fullmatch(r"[a-z_][\w./]*", first):
            named.update(part for part in first.split("/")[:-1] if part)
    assert named, "no folders found in the layout section"
    assert not sorted(named - folders), f"folders named but absent: {sorted(named - folders)}"
