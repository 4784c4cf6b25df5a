"""envs/*.yaml (for --use-conda) pin exactly the versions a test run installs, written from one
source: pyproject.toml (what each env needs) and envs/pins.txt (which versions)."""

import subprocess
import sys
import tomllib
from importlib import metadata

import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import pin_envs  # noqa: E402


def test_envs_are_what_pin_envs_writes():
    result = subprocess.run([sys.executable, str(REPO / "scripts/pin_envs.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_direct_dependency_is_pinned_to_the_installed_version():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = pin_envs.read_pins()
    names = pin_envs.direct_dependencies(pyproject)
    assert {"torch", "mlflow", "pandas", "snakemake", "pytest", "tqdm"} <= set(names)
    assert set(pins) == set(names), "envs/pins.txt and pyproject.toml's dependencies differ: run scripts/pin_envs.py --update"
    installed = {name: metadata.version(name) for name in names}
    assert installed == pins, "this environment is not the pinned one (scripts/setup.sh installs with -c envs/pins.txt)"


def test_every_env_pins_every_package_and_they_cover_the_package_dependencies():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = pin_envs.read_pins()
    covered = set()
    for env_file in sorted((REPO / "envs").glob("*.yaml")):
        env = yaml.safe_load(env_file.read_text())
        assert "python=3.11" in env["dependencies"], env_file
        [pip] = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
        for requirement in pip:
            name, version = requirement.split("==")
            assert pins[pin_envs.canonical(name)] == version, f"{env_file.name}: {requirement}"
            covered.add(pin_envs.canonical(name))
    runtime = {pin_envs.requirement_name(r) for r in pyproject["project"]["dependencies"]}
    assert covered == runtime, f"runtime dependencies no env installs: {runtime - covered}"


def test_every_rule_names_an_existing_env():
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        for line in smk.read_text().splitlines():
            if line.strip().startswith('"../../envs/'):
                assert (smk.parent / line.strip().strip('"')).resolve().is_file(), line
