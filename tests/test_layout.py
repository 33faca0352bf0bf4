"""The layout reads as the data path: the library imports neither stage, stage 1 never imports stage 2, no library
module imports a CLI module or the demo, and every module stays within 400 lines."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("larp_mllm", "tokenizer_training", "llm_adapters")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, at the top or inside functions; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


def _cli_modules() -> set[str]:
    """Console-script targets and modules with a `__main__` block."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    clis = {target.split(":")[0] for target in scripts.values()}
    clis |= {name for name, path in MODULES.items() if 'if __name__ == "__main__"' in path.read_text()}
    return clis


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _hits(name: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in IMPORTS[name] if m.split(".")[0] in prefixes or m in prefixes)


def test_the_library_imports_neither_stage():
    bad = {n: _hits(n, ("tokenizer_training", "llm_adapters", "examples")) for n in MODULES if n.startswith("larp_mllm")}
    assert not {n: h for n, h in bad.items() if h}


def test_stage_one_does_not_import_stage_two():
    bad = {n: _hits(n, ("llm_adapters", "examples")) for n in MODULES if n.startswith("tokenizer_training")}
    assert not {n: h for n, h in bad.items() if h}


def test_no_library_module_imports_a_cli_module():
    clis = _cli_modules()
    assert {"tokenizer_training.train", "llm_adapters.chat"} <= clis  # the walk sees the console scripts
    libraries = [n for n in MODULES if n not in clis]
    bad = {n: sorted(IMPORTS[n] & clis) for n in libraries}
    assert not {n: h for n, h in bad.items() if h}, "library modules import CLI modules"


@pytest.mark.parametrize("path", sorted([*MODULES.values(), *(REPO / "bench").glob("*.py"),
                                         *(REPO / "examples").rglob("*.py")]),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_modules_stay_within_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
