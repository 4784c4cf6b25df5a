#!/usr/bin/env python3
"""Pin the project's direct dependencies and write the conda envs from the pins.

One source of truth: ``pyproject.toml`` says which packages the project needs (ranges) and
which of them each rule's env holds (``[tool.decoupled.envs]``); ``envs/pins.txt`` says which
exact version of each is installed (``scripts/setup.sh`` installs with it as pip constraints).

    scripts/pin_envs.py            # write envs/*.yaml from pyproject.toml and envs/pins.txt
    scripts/pin_envs.py --check    # exit 1, naming the file, if envs/*.yaml are not what it writes
    scripts/pin_envs.py --update   # first re-pin envs/pins.txt to the versions installed here
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "envs/pins.txt"
PINS_HEADER = "# The exact versions of the direct dependencies, written by scripts/pin_envs.py --update\n# from a tested install; pip constraints for scripts/setup.sh, and the envs/*.yaml pins.\n"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """``snakemake[reports]>=9,<10`` -> ``snakemake``."""
    return canonical(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def direct_dependencies(pyproject: dict) -> list[str]:
    """Every package the project or one of its extras asks for, by name."""
    listed = list(pyproject["project"]["dependencies"])
    for extra in pyproject["project"].get("optional-dependencies", {}).values():
        listed += extra
    return sorted({requirement_name(r) for r in listed})


def read_pins() -> dict[str, str]:
    pins = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def update_pins(pyproject: dict) -> None:
    lines = [f"{name}=={metadata.version(name)}" for name in direct_dependencies(pyproject)]
    PINS.write_text(PINS_HEADER + "\n".join(lines) + "\n")


def env_files(pyproject: dict, pins: dict[str, str]) -> dict[Path, str]:
    """The text of each envs/<name>.yaml."""
    files = {}
    for name, env in pyproject["tool"]["decoupled"]["envs"].items():
        missing = [p for p in env["packages"] if canonical(p) not in pins]
        if missing:
            raise SystemExit(f"pin_envs: envs/pins.txt has no pin for {', '.join(missing)} (env {name}): run scripts/pin_envs.py --update")
        requirements = "".join(f"      - {p}=={pins[canonical(p)]}\n" for p in env["packages"])
        files[REPO / f"envs/{name}.yaml"] = (
            f"# {env['comment']}\n# Written by scripts/pin_envs.py from pyproject.toml and envs/pins.txt: do not edit.\n"
            "channels:\n  - conda-forge\n  - nodefaults\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n" + requirements
        )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare envs/*.yaml with what would be written")
    parser.add_argument("--update", action="store_true", help="re-pin envs/pins.txt to the installed versions first")
    args = parser.parse_args()
    pyproject = project()
    if args.update:
        update_pins(pyproject)
    unpinned = sorted(set(direct_dependencies(pyproject)) - set(read_pins()))
    if unpinned:
        print(f"pin_envs: envs/pins.txt has no pin for {', '.join(unpinned)}: run scripts/pin_envs.py --update", file=sys.stderr)
        return 1
    stale = []
    for path, text in env_files(pyproject, read_pins()).items():
        if not path.is_file() or path.read_text() != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"pin_envs: {', '.join(stale)} differ from pyproject.toml + envs/pins.txt: run scripts/pin_envs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
