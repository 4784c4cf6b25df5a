"""Which of this package's source files a training job runs, and a hash of their contents.

Snakemake re-runs a job when its code changes only for code written in the rule itself; our
rules call the CLI, so the workflow passes ``training_code_hash(method)`` to each training job
as a param instead (a changed param re-runs the job). The files are found by following the
``import`` statements from the CLI (``decoupled.__main__``) and from the method's own file,
read statically so that no torch is needed (Snakemake's environment may lack it):

* a method's file counts for that method only: the registry imports methods by name, so no
  shared file imports one, and ``fdg.py`` counts for FDG through its ``import`` of ``ddg.py``;
* every engine's files count for every job: the engine registry imports them by name, from
  their ``SPEC``s;
* the report package and the claims check are left out: they are inputs of the report rule,
  which alone re-runs.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "decoupled"
ROOT = Path(__file__).resolve().parent  # src/decoupled
# modules whose code never changes what a training job computes: the report's, and the claims'
# check that reading an experiment config runs (a job never reads report.claims)
NOT_TRAINING = ("decoupled.report", "decoupled.claims")


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (``decoupled.x.y``) in this package, or None."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {m for m in found if module_file(m) is not None}


def with_parents(name: str) -> list[str]:
    """``decoupled.a.b`` and the packages that importing it runs first: decoupled, decoupled.a."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def training_files(method: str) -> tuple[Path, ...]:
    """The source files a training job of ``method`` runs: the package's, and the method's own
    file where it lives outside the package (``DECOUPLED_METHOD_DIRS``)."""
    from decoupled import engines, methods

    own = methods.file_of(method)
    outside = own.parent != ROOT / "methods"
    # the registries import engines and methods by name, which no import statement shows
    engine_modules = {f"{PACKAGE}.engines.{module}" for name in engines.names() for module in engines.spec(name).modules()}
    todo, seen = [f"{PACKAGE}.__main__", *sorted(engine_modules)] + ([] if outside else [f"{PACKAGE}.methods.{method}"]), set()
    if outside:
        todo += [m for imported in imported_modules(own, f"decoupled_method_{method}") for m in with_parents(imported)]
    while todo:
        name = todo.pop()
        if name in seen or name.startswith(NOT_TRAINING):
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        for imported in imported_modules(path, name):
            todo.extend(with_parents(imported))
    files = {module_file(name) for name in seen if module_file(name) is not None}
    return tuple(sorted(files | ({own} if outside else set())))


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name  # a method of one's own: its file name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:10]


@cache
def training_code_hash(method: str) -> str:
    """Hashes of the contents of ``training_files(method)`` (with their paths): the shared code's
    and the method files', so that `snakemake -n`'s "before/now" shows which of them changed."""
    from decoupled import methods

    files = training_files(method)
    method_files = {methods.file_of(name) for name in methods.names()}
    own = [p for p in files if p in method_files]
    shared = [p for p in files if p not in own]
    return f"shared code {_digest(shared)}, {'+'.join(p.stem for p in own)} {_digest(own)}"
