"""The README's commands are the ones CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_cmd = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci_cmd) == 1 and ci_cmd[0].strip() in readme


def layout_problems(readme: str, root: Path) -> list[str]:
    """The package's lines of the README's Layout block (``dide_scale/`` and the indented ones
    below it) against the tree: every module named (a folder such as ``data/convert/`` names
    what it holds), every file named present."""
    block = readme.split("## Layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    pkg = root / "dide_scale"
    package_lines = [line for line in block.splitlines() if line.startswith((" ", "dide_scale/"))]
    named = {w for line in package_lines for w in line.split() if w.endswith((".py", "/"))}
    out = [f"README Layout names {w}, which does not exist" for w in sorted(named)
           if w.endswith(".py") and not (pkg / w).is_file()]
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg).as_posix()
        if f.name != "__init__.py" and not any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in named):
            out.append(f"README Layout does not name dide_scale/{rel}")
    return out


def test_readme_layout_names_every_module_and_only_real_files(tmp_path):
    assert layout_problems((ROOT / "README.md").read_text(), ROOT) == []
    # the check itself: a module missing from the block and a name without a file are both found
    (tmp_path / "dide_scale" / "data").mkdir(parents=True)
    for name in ("a.py", "data/b.py", "data/__init__.py"):
        (tmp_path / "dide_scale" / name).write_text("")
    readme = "## Layout\n```text\ndide_scale/  a.py  gone.py\n```\n"
    assert layout_problems(readme, tmp_path) == ["README Layout names gone.py, which does not exist",
                                                 "README Layout does not name dide_scale/data/b.py"]
