"""Imports point downwards only (STYLE §4.3): config <- model <- engine <- {cli, serve, view, bundled};
config <- sampling <- engine; text is a leaf used by engine and cli. Parsed from the source, not imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "dgemma"

# package area -> areas it may import from (besides itself)
ALLOWED = {
    "config": set(),
    "text": set(),
    "sampling": {"config"},
    "model": {"config"},
    "engine": {"config", "model", "sampling", "text", "quant"},
    "quant": {"config", "model", "argtypes"},
    "plan": {"config", "model", "quant", "sampling", "argtypes"},  # sampling: the sampler step's work-buffer sizes
    "bundled": {"config", "model", "text"},
    "train": {"config", "model", "sampling", "text", "argtypes"},
    "sudoku": {"config", "model", "sampling", "text", "engine", "train", "argtypes"},
    "view": set(),
    "argtypes": {"sampling"},
    "serve": {"config", "engine", "text", "argtypes"},
    "canvas_cli": {"engine", "argtypes"},
    "cli": {"config", "model", "sampling", "engine", "text", "bundled", "view", "sudoku", "train", "argtypes",
            "serve", "canvas_cli", "quant", "plan"},
    "__main__": {"cli"},
    "__init__": {"config", "engine", "model"},
}


def area_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_areas(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    own = area_of(path)
    depth_of_file = len(path.relative_to(PACKAGE).parts) - 1
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            parts = (node.module or "").split(".")
            if node.level - 1 == depth_of_file:  # relative to the package root
                found.add(parts[0] if parts[0] else node.names[0].name)
            elif node.level - 1 < depth_of_file:
                found.add(own)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dgemma."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dgemma."))
    return found - {own}


def test_imports_point_downwards():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        area = area_of(path)
        assert area in ALLOWED, f"{path}: new package area {area!r}; add it to ALLOWED with its allowed imports"
        for target in imported_areas(path) - ALLOWED[area]:
            bad.append(f"{path.relative_to(PACKAGE.parent)} imports dgemma.{target}")
    assert not bad, "layering violations:\n" + "\n".join(bad)
