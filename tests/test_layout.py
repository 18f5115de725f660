"""The package's shape: folders by stage, small modules, one direction of flow (docs/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdcache"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(file: Path) -> list[str]:
    """The kdcache modules ``file`` imports (relative imports resolved), at any depth in it."""
    here = file.relative_to(PACKAGE.parent).with_suffix("").parts
    package = here if file.name == "__init__.py" else here[:-1]
    if file.name == "__init__.py":
        package = here[:-1]
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                found += [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif node.module and node.module.startswith("kdcache"):
                found.append(node.module)
    return found


def test_the_top_level_reads_as_the_architecture():
    top = [p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")]
    folders = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 12, top
    assert len(folders) >= 6, folders
    prefixes = [name.lstrip("_").split("_")[0] for name in top]
    assert len(prefixes) == len(set(prefixes)), f"a family of modules wants a folder: {sorted(top)}"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_no_module_imports_names_from_the_package_root():
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    offenders = [f"{p.relative_to(PACKAGE)}: {name}" for p in _modules() if p != PACKAGE / "__init__.py"
                 for name in _imports(p)
                 if name.startswith("kdcache.") and name.count(".") == 1 and name.split(".")[1] not in submodules
                 or name == "kdcache"]
    assert offenders == []


def test_stage_two_and_the_losses_never_import_stage_one():
    offenders = [f"{p.relative_to(PACKAGE)} imports {name}" for p in _modules()
                 if p.relative_to(PACKAGE).parts[0] in ("read", "train", "losses", "format", "store")
                 for name in _imports(p) if name.startswith("kdcache.dump")]
    assert offenders == []
    losses = [f"{p.relative_to(PACKAGE)} imports {name}" for p in (PACKAGE / "losses").glob("*.py")
              for name in _imports(p) if not name.startswith("kdcache.losses")]
    assert losses == []  # losses know no cache
