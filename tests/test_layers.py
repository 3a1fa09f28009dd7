"""The floor plan: imports go one way between the project's packages.

    core (ground floor) ← indexer ← engine ← service
    core ← encoders.model ← encoders.training (→ indexer's shard writer)
    cli.py and benchmarks/ wire the stages together.

Every module's imports are parsed (lazy ones inside functions included), so a violation fails
here even when no test happens to execute the importing line.
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "indexer", "engine", "encoders", "service", "benchmarks")
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "indexer": {"core"},
    "engine": {"core", "indexer"},
    "service": {"core", "indexer", "engine"},
    "encoders.model": {"core"},
    "encoders.training": {"core", "encoders.model", "indexer"},
    "benchmarks": {"core", "indexer", "engine", "encoders.model", "encoders.training"},
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "encoders":
        return ".".join(parts[:2]) if len(parts) > 1 else "encoders"
    if parts[0] in PACKAGES or parts[0] == "cli":
        return parts[0]
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module_name(path).split(".")
                base = base[:len(base) - node.level + (path.name == "__init__.py")]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def project_edges() -> set[tuple[str, str, str]]:
    edges = set()
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + [ROOT / "cli.py"]
    for path in files:
        src = layer_of(module_name(path))
        for target in imports_of(path):
            dst = layer_of(target)
            if dst and src and dst != src:
                edges.add((src, dst, str(path.relative_to(ROOT))))
    return edges


def test_imports_follow_the_layers():
    bad = sorted(f"{file}: {src} imports {dst}" for src, dst, file in project_edges()
                 if src in ALLOWED and dst not in ALLOWED[src])
    assert not bad, "\n".join(bad)


def test_no_package_level_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in project_edges():
        graph.setdefault(src.split(".")[0], set()).add(dst.split(".")[0])
    for node in graph:
        graph[node].discard(node)

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph.get(a, ()))
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The parser itself: an import inside a function and a relative import both count."""
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from encoders.model import query\nfrom .y import z\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports_of(pkg / "x.py") == {"encoders.model", "engine.y"}


def test_the_indexer_loads_no_torch():
    """DESIGN: the indexer knows nothing about torch. Importing it must not load torch either
    (an index build, and the driver of a Ray build, would carry ~260 MB more memory)."""
    import subprocess

    code = ("import sys, indexer.build, indexer.distributed, indexer.reader, indexer.info; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
