"""The package's import graph, read from the source with ``ast`` (top-level and in-function
imports alike): no circle, and no module importing one in a layer above its own.

The layers, lowest first, are the ones docs/ARCHITECTURE.md draws (checked below).  A module
belongs to the layer of the longest prefix listed; a new module must be placed in one.
"""
import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dide_scale"
LAYERS = [
    ("base", ["fsutil", "rng", "console", "distributed", "lease", "rundir", "config", "configdoc"]),
    ("models", ["models"]),
    ("data", ["data", "labels"]),
    ("training parts", ["losses", "negatives", "objective", "build", "engine", "checkpoint", "metrics", "export"]),
    ("evaluation", ["inference", "retrieval", "captions", "evaluate"]),
    ("loop", ["trainer"]),
    ("commands", ["train", "finetune", "demo", "data.cli", "launch", "bench"]),
]


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root/package``."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (``from . import x`` counts as
    importing ``x``; ``from .x import y`` as importing ``x``, or ``x.y`` when that is a module)."""
    return imports_in(name, path, ast.parse(path.read_text(encoding="utf-8")), known)


def imports_in(name: str, path: Path, tree: ast.AST, known: dict[str, Path]) -> set[str]:
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    known = modules(root, package)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def layer_of(module: str, layers=LAYERS, package: str = PACKAGE) -> int | None:
    """Index of the layer listing the longest prefix of ``module``; None when none does."""
    rel = module[len(package) + 1:]
    best = None
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (rel == p or rel.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def problems(graph: dict[str, set[str]], layers=LAYERS, package: str = PACKAGE) -> list[str]:
    """Every rule the graph breaks, one line each: a circle, an unplaced module, an upward import."""
    out = []
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        out.append("import circle: " + " -> ".join(e.args[1]))
    for m in sorted(graph):
        if m == package:
            continue
        mine = layer_of(m, layers, package)
        if mine is None:
            out.append(f"{m} is in no layer: add it to LAYERS here and in docs/ARCHITECTURE.md")
            continue
        for dep in sorted(graph[m]):
            theirs = layer_of(dep, layers, package)
            if theirs is not None and theirs > mine:
                out.append(f"{m} ({layers[mine][0]}) imports {dep} ({layers[theirs][0]}), a layer above it")
    return out


# The heavy boundary: the only places where a module of the package is imported inside a
# function (module -> what it may import there; None: any module but the light ones).  Elsewhere
# imports are at the top, where they list a module's dependencies.
LAZY = {"checkpoint": {"engine"}, "export": {"build", "engine"}, "data.convert.img2dataset": {"data.pipeline"},
        "train": None, "demo": None, "data.cli": None, "launch.submit": None}
LIGHT = {"config", "configdoc", "console", "distributed", "lease", "rundir", "models.sources"}  # no torch


def lazy_imports(root: Path = ROOT, package: str = PACKAGE) -> set[tuple[str, str]]:
    """(module, imported module) for every import of the package inside a function."""
    known = modules(root, package)
    out = set()
    for m, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = ast.Module(body=fn.body, type_ignores=[])
                out |= {(m, dep) for dep in imports_in(m, path, body, known)}
    return out


def misplaced_lazy_imports(lazy: set[tuple[str, str]], package: str = PACKAGE) -> list[str]:
    def rel(name):
        return name[len(package) + 1:]
    out = []
    for m, dep in sorted(lazy):
        allowed = LAZY.get(rel(m), set())
        if (allowed is None and rel(dep) in LIGHT) or (allowed is not None and rel(dep) not in allowed):
            out.append(f"{m} imports {dep} inside a function: import it at the top")
    return out


def test_own_modules_are_imported_in_functions_only_at_the_heavy_boundary():
    lazy = lazy_imports()
    assert (f"{PACKAGE}.train", f"{PACKAGE}.trainer") in lazy  # the reader sees in-function imports
    assert misplaced_lazy_imports(lazy) == []
    assert misplaced_lazy_imports({(f"{PACKAGE}.trainer", f"{PACKAGE}.task"), (f"{PACKAGE}.train", f"{PACKAGE}.config"),
                                   (f"{PACKAGE}.train", f"{PACKAGE}.engine")}) == [
        f"{PACKAGE}.train imports {PACKAGE}.config inside a function: import it at the top",
        f"{PACKAGE}.trainer imports {PACKAGE}.task inside a function: import it at the top"]


def test_the_package_has_no_import_circle_and_no_upward_import():
    graph = import_graph()
    assert len(graph) > 50 and graph[f"{PACKAGE}.trainer"]  # the reader sees the package
    assert f"{PACKAGE}.evaluate" in graph[f"{PACKAGE}.trainer"]  # an in-function import counts
    assert problems(graph) == []


def test_architecture_doc_lists_the_same_layers():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for i, (name, prefixes) in enumerate(LAYERS, 1):
        line = f"{i}. **{name}**: " + ", ".join(f"`{p}`" for p in prefixes)
        assert line in doc, f"docs/ARCHITECTURE.md lacks the layer line {line!r}"


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return import_graph(tmp_path, "pkg")


LOW_HIGH = [("low", ["low"]), ("high", ["high", "sub"])]


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "low.py": "def f():\n    from . import high\n", "high.py": "from .low import f\n"},
     ["import circle", "pkg.low (low) imports pkg.high (high), a layer above it"]),
    ({"__init__.py": "", "low.py": "", "high.py": "from .sub.a import x\n", "sub/__init__.py": "",
      "sub/a.py": "import pkg.sub.b\n", "sub/b.py": "def g():\n    from .a import y\n"},
     ["import circle"]),
    ({"__init__.py": "", "low.py": "", "high.py": "from . import low\n", "new.py": ""},
     ["pkg.new is in no layer"]),
    ({"__init__.py": "", "low.py": "", "high.py": "from .low import f\n\ndef g():\n    from . import low\n"}, []),
])
def test_the_checker_finds_circles_upward_imports_and_unplaced_modules(tmp_path, files, expected):
    found = problems(_package(tmp_path, files), LOW_HIGH, "pkg")
    assert len(found) == len(expected) and all(f.startswith(e) for f, e in zip(found, expected)), found


def tool_problems(tools_dir: Path, package: str = PACKAGE) -> list[str]:
    """What a tool does that it should not: edit ``sys.path`` or import a private name of the package."""
    out = []
    for f in sorted(tools_dir.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    getattr(node.value.value, "id", None) == "sys" and node.value.attr == "path":
                out.append(f"{f.name}:{node.lineno} edits sys.path")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package:
                out += [f"{f.name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
    return sorted(out)


def test_tools_import_the_package_by_its_public_names():
    assert tool_problems(ROOT / "tools") == []


def test_the_tool_checker_finds_path_edits_and_private_names(tmp_path):
    (tmp_path / "a.py").write_text("import sys\nsys.path.insert(0, '.')\nfrom dide_scale.demo import _x, y\n")
    (tmp_path / "b.py").write_text("import sys\nfrom dide_scale.demo import y\nprint(sys.argv)\n")
    assert tool_problems(tmp_path) == ["a.py:2 edits sys.path", "a.py:3 imports dide_scale.demo._x"]


@pytest.mark.parametrize("module", ["dide_scale.train", "dide_scale.finetune", "dide_scale.demo",
                                    "dide_scale.data.cli", "dide_scale.launch.submit"])
def test_help_imports_no_heavy_library(module):
    """``--help`` of a command imports neither DeepSpeed nor transformers (seconds each): the
    in-function imports that keep it so are the heavy boundary docs/ARCHITECTURE.md describes."""
    import subprocess
    import sys
    code = (f"import sys\nfrom {module} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
