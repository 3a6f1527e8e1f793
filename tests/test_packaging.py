"""Packaging checks, from the source tree and without building: what the code loads at runtime ships in the wheel.

An editable install reads files straight from the checkout, so a data file missing from `package-data` passes every
other test and only breaks for users of a release. These checks read `pyproject.toml` and the code instead.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
INCLUDE = SETUPTOOLS["packages"]["find"]["include"]
PACKAGES = sorted(
    p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, i) for i in INCLUDE)
)
#: Code that reads a path next to its own file on purpose, and why that needs no package data.
FILE_RELATIVE_OK = {
    "blip_tools/cli/bench.py": "looks for the source checkout's benchmarks/ folder, which the wheel does not ship",
}
_RESOURCE_LOAD = re.compile(r"""resources\.files\(\s*["']([\w.]+)["']\s*\)((?:\s*/\s*["'][^"']+["'])*)""")


def _source_files(suffix: str | None = None) -> list[Path]:
    """Files inside the packages (no caches), optionally only those ending in `suffix`."""
    out = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            cached = "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo")
            if path.is_file() and not cached and (suffix is None or path.suffix == suffix):
                out.append(path)
    return sorted(out)


def _package_data_files() -> set[Path]:
    """The data files `[tool.setuptools.package-data]` puts in the wheel (patterns are globs from each package)."""
    covered: set[Path] = set()
    for key, patterns in SETUPTOOLS.get("package-data", {}).items():
        bases = [ROOT / p for p in PACKAGES] if key == "*" else [ROOT / key.replace(".", "/")]
        for base in bases:
            for pattern in patterns:
                covered.update(p for p in base.glob(pattern) if p.is_file())
    return covered


def test_packages_found_are_the_two_libraries() -> None:
    assert PACKAGES == ["blip_tools", "mcp_server"]
    for name in ("tests", "benchmarks", "examples", "docs"):
        assert not any(fnmatch.fnmatch(name, pat) for pat in INCLUDE), name


def test_every_data_file_in_the_packages_ships() -> None:
    """Anything in a package folder that is not Python source is there to be loaded, so it must be package data."""
    data = [p for p in _source_files() if p.suffix != ".py"]
    assert data, "expected py.typed and the console's static files"
    missing = [p.relative_to(ROOT).as_posix() for p in data if p not in _package_data_files()]
    assert not missing, f"not matched by [tool.setuptools.package-data] in pyproject.toml: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_py_typed_ships(package: str) -> None:
    marker = ROOT / package / "py.typed"
    assert marker.is_file()
    assert marker in _package_data_files()


def test_resource_loads_point_at_shipped_files() -> None:
    """Each `importlib.resources.files("pkg") / "a" / ...` in the code names files the wheel holds."""
    loads = []
    for path in _source_files(".py"):
        for match in _RESOURCE_LOAD.finditer(path.read_text(encoding="utf-8")):
            parts = re.findall(r"""["']([^"']+)["']""", match.group(2))
            loads.append((path, ROOT.joinpath(*match.group(1).split("."), *parts)))
    assert loads, "expected at least the web console's static folder"
    shipped = _package_data_files()
    for source, target in loads:
        files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
        assert files, f"{source.relative_to(ROOT)} loads {target.relative_to(ROOT)}, which holds no files"
        missing = [p.relative_to(ROOT).as_posix() for p in files if p not in shipped]
        assert not missing, f"{source.relative_to(ROOT)} loads files the wheel lacks: {missing}"


def test_no_unexpected_file_relative_loads() -> None:
    """`Path(__file__)` reads work in a checkout but not from a wheel unless the target is package data."""
    found = {
        p.relative_to(ROOT).as_posix()
        for p in _source_files(".py")
        if re.search(r"\b__file__\b", p.read_text(encoding="utf-8"))
    }
    unexpected = sorted(found - FILE_RELATIVE_OK.keys())
    assert not unexpected, (
        f"{unexpected} use __file__: load package files with importlib.resources and list them in package-data, "
        "or add the file to FILE_RELATIVE_OK with the reason it needs no package data"
    )


@pytest.mark.parametrize("name", sorted(PYPROJECT["project"]["scripts"]))
def test_console_scripts_resolve(name: str) -> None:
    module, _, func = PYPROJECT["project"]["scripts"][name].partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert func in defined | imported, f"{name} = {module}:{func}, but {path.relative_to(ROOT)} has no {func}"


def test_version_has_one_source() -> None:
    """The distribution's version is read from `blip_tools.__version__`, a literal setuptools reads without import."""
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "blip_tools.__version__"}
    tree = ast.parse((ROOT / "blip_tools" / "__init__.py").read_text(encoding="utf-8"))
    values = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in n.targets)
        and isinstance(n.value, ast.Constant)
        and isinstance(n.value.value, str)
    ]
    assert len(values) == 1, f'blip_tools/__init__.py needs one `__version__ = "X.Y.Z"` literal, got {values}'
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", str(values[0])), values


def test_extras_named_in_messages_exist() -> None:
    """Every `pip install 'blip-tools[x]'` the code or the README suggests names a declared extra."""
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    texts = [p.read_text(encoding="utf-8") for p in _source_files(".py")]
    texts.append((ROOT / "README.md").read_text(encoding="utf-8"))
    groups = [g for t in texts for g in re.findall(r"blip-tools\[([\w,\s-]+)\]", t)]
    named = {e.strip() for g in groups for e in g.split(",")}
    assert named, "expected the [ray] and [lora] hints"
    assert named <= extras, f"extras suggested but not declared: {sorted(named - extras)}"


def test_sdist_carries_the_whole_test_suite() -> None:
    """Without `graft tests` setuptools puts only tests/test_*.py in the sdist: no conftest.py, no sub-folders."""
    lines = [line.split() for line in (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines()]
    assert ["graft", "tests"] in lines
    assert ["graft", "benchmarks"] in lines  # tests/test_bench.py runs it


def test_importing_the_packages_loads_no_model_libraries() -> None:
    """LangChain and MCP users import these at startup; torch and transformers load on first model use only."""
    code = (
        "import sys, blip_tools, blip_tools.langchain, blip_tools.cli, mcp_server, mcp_server.cli; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported eagerly: {done.stdout.strip()}"


@pytest.mark.parametrize("package", ["blip_tools", "mcp_server"])
def test_every_public_name_resolves_and_the_package_itself_imports_nothing_heavy(package: str) -> None:
    """The packages load their public names on first use (a quick entry point import, so an early Ctrl-C is
    quiet): every name in `__all__` must still resolve, and `import package` alone must stay light."""
    code = (
        f"import json, sys, {package}; "
        "print(json.dumps({"
        "'heavy': sorted(m for m in ('pydantic', 'PIL', 'mcp') if m in sys.modules), "
        f"'unresolved': [n for n in {package}.__all__ if getattr({package}, n, None) is None], "
        f"'not_in_dir': sorted(set({package}.__all__) - set(dir({package})))"
        "}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"heavy": [], "unresolved": [], "not_in_dir": []}


def test_the_declared_license_ships_its_text() -> None:
    """Apache-2.0 asks for its text to go with every copy: the wheel and sdist take it from `license-files`."""
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    files = PYPROJECT["project"]["license-files"]
    assert files == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_building_a_service_or_a_toolkit_loads_no_model_libraries() -> None:
    """A LangChain app builds its toolkit at startup: that must not cost torch's import (2 s) before any image."""
    code = (
        "import sys\n"
        "from blip_tools import Blip2Service, BlipSettings\n"
        "from blip_tools.langchain import Blip2Toolkit\n"
        "service = Blip2Service(BlipSettings(device='cuda:7'))\n"  # loads lazily (start() would load now)
        "tools = Blip2Toolkit(service=service).get_tools()\n"
        "assert tools, 'no tools'\n"
        "service.close()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
