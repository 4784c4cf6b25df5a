"""Experiment configs: load, validate against the schema, fill in defaults.

The schema (``schema.yaml`` in this package, linked from ``config/schema.yaml``) is the one
description of every key. Snakemake validates the workflow's config with it and this module
validates each job with it, so a job started by hand obeys the same rules.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from decoupled.credentials import redact, without_password
from decoupled.errors import UserError


@cache
def schema() -> dict:
    return yaml.safe_load(resources.files("decoupled").joinpath("schema.yaml").read_text())


def _with_defaults(validator_class):
    """A validator that also writes each property's default into the instance (as Snakemake does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub_schema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop and name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])
        yield from validate_properties(validator, properties, instance, sub_schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def describe(error: jsonschema.ValidationError) -> str:
    """One line naming the key (as a dotted path) and what is wrong with it (a password in the
    value shown as ***). A schema's own ``errorMessage`` says it for a pattern."""
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    message = error.message
    if error.validator == "pattern" and "errorMessage" in error.schema:
        message = f"{error.instance!r} {error.schema['errorMessage']}"
    return redact(f"config key '{where}': {message}")


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled in; UserError on the first
    problem. Its ``tracking_uri`` holds no password (``decoupled.credentials``)."""
    config = copy.deepcopy(config)
    error = jsonschema.exceptions.best_match(_Validator(schema()).iter_errors(config))
    if error is not None:
        raise UserError(describe(error))
    if "tracking_uri" in config:
        config["tracking_uri"] = without_password(config["tracking_uri"])
    return config


def validate_section(name: str, value: Any) -> Any:
    """Validate one top-level section (e.g. ``dataset``) on its own, defaults filled in."""
    wrapped = {name: copy.deepcopy(value)}
    section_schema = {"$defs": schema()["$defs"], "type": "object", "properties": {name: schema()["properties"][name]}}
    error = jsonschema.exceptions.best_match(_Validator(section_schema).iter_errors(wrapped))
    if error is not None:
        raise UserError(describe(error))
    return wrapped[name]


def load(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory: give a YAML file, e.g. config/config.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of keys")
    return validate(raw)


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s values put in, recursing into nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``: the form MLflow params take."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
