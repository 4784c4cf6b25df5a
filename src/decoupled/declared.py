"""What a file declares as a literal (a method's ``TRAITS``, an engine's ``SPEC``), read from its
text without running it, so that the grid and the workflow learn it without importing torch."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from decoupled.errors import UserError


def declared(path: Path, name: str, kind: type) -> dict | None:
    """The literal dict that ``path`` assigns to ``name`` at its top level (None where it assigns
    none), every key a field of the dataclass ``kind``."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise UserError(f"{path}: {name} must be a literal dict") from None
            known = [f.name for f in fields(kind)]
            unknown = set(value) - set(known)
            if unknown:
                raise UserError(f"{path}: unknown {name} fields {', '.join(sorted(unknown))} (known: {', '.join(known)})")
            return value
    return None
