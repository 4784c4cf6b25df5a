"""envs/*.yaml (for --use-conda) must install exactly what pyproject.toml asks for."""

import tomllib

import yaml

from conftest import REPO


def pip_requirements(env_file):
    env = yaml.safe_load(env_file.read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return env, (pip[0] if pip else [])


def test_envs_match_package_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"])
    used = set()
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert {f.stem for f in env_files} >= {"data", "tracking", "train", "report"}
    for env_file in env_files:
        env, requirements = pip_requirements(env_file)
        assert "python=3.11" in env["dependencies"], env_file
        unknown = set(requirements) - declared
        assert not unknown, f"{env_file.name} asks for {unknown}, which pyproject.toml does not declare (or pins differently)"
        used |= set(requirements)
    assert declared == used, f"pyproject.toml dependencies no env installs: {declared - used}"


def test_every_rule_names_an_existing_env():
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        for line in smk.read_text().splitlines():
            if line.strip().startswith('"../../envs/'):
                assert (smk.parent / line.strip().strip('"')).resolve().is_file(), line
