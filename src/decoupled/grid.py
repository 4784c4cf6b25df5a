"""The experiment grid: which training jobs an experiment config asks for, and each job's config.

An experiment config names lists under ``grid``: methods × modes × K × seeds, and, where they
apply, settings swept per run: ``slowdown``, ``buffer_size`` and ``budget`` (async runs) and
``beta`` (methods that have one, FDG). The swept settings of a run make its *variant*, a short
name such as ``S4m1_B10`` (slowdown 4 on module 1, buffer 10; ``S4m1_B10_time`` under
``async.budget: time``), ``beta0.5``, or ``default``.
A *job* config is one point of the grid with per-method ``overrides`` applied: the shared
sections (dataset, model, train, async, ...) plus ``run: {method, mode, K, variant, seed}``.

Snakemake imports this module to expand its wildcards and the CLI uses it to resolve and
re-check a job, so both agree on every job. It must not import torch: Snakemake's own
environment may not have it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decoupled import config as config_lib
from decoupled import dataset_traits, engines, methods
from decoupled.errors import UserError
from decoupled.networks import shapes


def method_names() -> list[str]:
    """The registered methods (``decoupled.methods``: found without importing torch)."""
    return methods.names()


@dataclass(frozen=True, order=True)
class RunKey:
    method: str
    mode: str
    K: int
    seed: int
    variant: str = "default"

    @classmethod
    def of(cls, run: dict[str, Any]) -> "RunKey":
        """The key of a job config's ``run`` mapping."""
        return cls(run["method"], run["mode"], run["K"], run["seed"], run.get("variant", "default"))

    @property
    def path(self) -> str:
        """Where the run's outputs live, relative to the results directory."""
        return f"runs/{self.method}/{self.mode}/K{self.K}/{self.variant}/seed{self.seed}"

    @property
    def name(self) -> str:
        parts = [self.method, self.mode, f"K{self.K}"] + ([self.variant] if self.variant != "default" else []) + [f"seed{self.seed}"]
        return "-".join(parts)

    @property
    def run_name(self) -> str:
        """The MLflow run's name of a job known without its experiment (``decoupled train`` given
        a job config): every part of its key, e.g. ``dgl async K3 S4m1_B10 s0``. A job of an
        experiment is named by ``run_name(config, key)``."""
        return " ".join([self.method, self.mode, f"K{self.K}"] + ([self.variant] if self.variant != "default" else []) + [f"s{self.seed}"])


def runs(config: dict[str, Any]) -> list[RunKey]:
    """Every job of the grid, after checking that each one can be built."""
    config = config_lib.validate(config)
    grid = config["grid"]
    keys = []
    for method in grid["methods"]:
        methods.check(method)
        own = _with_overrides(config, method)  # its overrides applied: its modes, the base of each swept setting
        for mode in own["grid"]["modes"]:
            if mode == "async" and methods.traits(method).sync_only:
                continue  # e.g. backprop: the locked baseline has no async form
            for K, variant in _points(own, method, mode):
                keys += [RunKey(method, mode, K, seed, variant) for seed in grid["seeds"]]
    if not keys:
        raise UserError("config key 'grid': no job to run (every method listed is sync-only and its modes are async only)")
    for key in keys:
        job_config(config, key)  # raises on the first job that cannot run
    return keys


def _with_overrides(config: dict[str, Any], method: str) -> dict[str, Any]:
    """The experiment config as ``method`` sees it: its overrides applied, defaults filled in."""
    merged = config_lib.deep_merge(config, config.get("overrides", {}).get(method, {}))
    try:
        return config_lib.validate(merged)
    except UserError as e:
        raise UserError(f"{e} (after overrides.{method})") from None


# Sections of an experiment config that are not settings of a training job (where files go,
# the grid itself, the report), so changing them never re-runs training.
NOT_JOB_SETTINGS = ("grid", "overrides", "output_dir", "report")

Option = tuple[str, dict[str, Any]]  # (part of a variant name, the settings it stands for)


def _axes(config: dict[str, Any], method: str, mode: str) -> list[tuple[Option, list[Option]]]:
    """Each swept setting that applies to ``method`` in ``mode``: its base option and the grid's options."""
    grid, base_async = config["grid"], config["async"]
    axes = []
    if mode == "async":
        base = {"factor": base_async["slowdown_factor"], "module": base_async["slowed_module"]}
        axes.append((_slowdown(base), [_slowdown(s) for s in grid.get("slowdown") or [base]]))
        size = base_async["buffer_size"]
        axes.append(((f"B{size}", {"buffer_size": size}), [(f"B{b}", {"buffer_size": b}) for b in grid.get("buffer_size") or [size]]))
        budget = base_async["budget"]
        axes.append((_budget(budget), [_budget(b) for b in grid.get("budget") or [budget]]))
    if "model.groups" in methods.traits(method).reads:
        groups = config["model"]["groups"]
        axes.append(((f"G{groups}", {"groups": groups}), [(f"G{g}", {"groups": g}) for g in grid.get("groups") or [groups]]))
    quantize = config["model"]["quantize"]
    axes.append((_quantize(quantize), [_quantize(q) for q in grid.get("quantize") or [quantize]]))
    if "train.synth_last_block" in methods.traits(method).reads:
        last = config["train"]["synth_last_block"]
        axes.append((method_form(last), [method_form(on) for on in grid.get("synth_last_block") or [last]]))
    if methods.traits(method).sweeps_beta:
        beta = config["train"]["beta"]
        axes.append(((f"beta{beta:g}", {"beta": beta}), [(f"beta{b:g}", {"beta": b}) for b in grid.get("beta") or [beta]]))
    return axes


def _slowdown(slowdown: dict) -> Option:
    module = slowdown.get("module")
    name = f"S{slowdown['factor']:g}" + (f"m{module}" if module is not None else "")
    return name, {"slowdown_factor": slowdown["factor"], "slowed_module": module}


def _quantize(setting: dict | list | None) -> Option:
    """``model.quantize`` as a variant's part: "" (floats), "q4d4" (bits 4, dim 4; "q4d4r0.9" at
    decay 0.9), or per boundary "q4d4-none"."""
    def name(q: dict | None) -> str:
        return "none" if q is None else f"q{q['bits']}d{q['dim']}" + (f"r{q['decay']:g}" if q["decay"] != DEFAULT_DECAY else "")

    if isinstance(setting, list):
        return "-".join(name(q) for q in setting), {"quantize": setting}
    return ("" if setting is None else name(setting)), {"quantize": setting}


DEFAULT_DECAY = 0.99  # the schema's quantize.decay


def method_form(synth_last_block: bool) -> Option:
    """DNI's and cDNI's form as a variant's part: "" for the DGL code's, with a synthesizer after
    the last block too; "nolastsynth" for the last block on the true loss. Any variant of a run
    in the project's own form names it, so that a table never shows it as the authors' method."""
    return ("" if synth_last_block else "nolastsynth"), {"synth_last_block": synth_last_block}


def _budget(budget: str) -> Option:
    # the default budget adds nothing to a variant's name: "S4m0_B10", and "S4m0_B10_time"
    return ("" if budget == "updates" else budget), {"budget": budget}


def _combine(options: list[Option]) -> Option:
    settings = {}
    for _, more in options:
        settings.update(more)
    return "_".join(name for name, _ in options if name) or "default", settings


def variants(config: dict[str, Any], method: str, mode: str) -> dict[str, dict[str, Any]]:
    """Every combination of the swept settings that apply to ``method`` in ``mode``, by variant name."""
    combos: list[list[Option]] = [[]]
    for _, options in _axes(config, method, mode):
        combos = [combo + [option] for combo in combos for option in options]
    return dict(_combine(combo) for combo in combos)


def base_variant(config: dict[str, Any], method: str, mode: str) -> str:
    """The variant of ``method``'s runs in ``mode`` that has every swept setting at its base (the
    config's own value, after the method's overrides): its reference runs."""
    return _combine([base for base, _ in _axes(_with_overrides(config, method), method, mode)])[0]


def _points(config: dict[str, Any], method: str, mode: str) -> list[tuple[int, str]]:
    """The (K, variant) pairs to run: all combinations, or one axis at a time around the base."""
    Ks = config["grid"]["K"]
    if config["grid"]["design"] == "product":
        return [(K, name) for K in Ks for name in variants(config, method, mode)]
    axes = _axes(config, method, mode)
    base = [base_option for base_option, _ in axes]
    points = [(K, _combine(base)[0]) for K in Ks]
    for i, (_, options) in enumerate(axes):
        points += [(Ks[0], _combine(base[:i] + [option] + base[i + 1 :])[0]) for option in options]
    if mode == "async":  # what a slowdown costs depends on the budget: sweep it under each one
        (_, slowdowns), _, (_, budgets) = axes[:3]
        points += [(Ks[0], _combine([s, base[1], b] + base[3:])[0]) for s in slowdowns for b in budgets]
    return list(dict.fromkeys(points))


def run_name(config: dict[str, Any], key: RunKey) -> str:
    """The MLflow run's name of one job of an experiment: its method, its mode, what the grid
    varies (K where it lists several, the variant's part of each setting it sweeps for this
    method and mode), its seed; e.g. ``dgl sync s0``, ``dgl async S4m1 s0``. A setting the grid
    does not sweep (the async runs' one slowdown and buffer, FDG's one beta) is left out: it is
    the same on every run of that method and mode."""
    config = _with_overrides(config, key.method)
    settings = variants(config, key.method, key.mode)[key.variant]
    parts = [key.method, key.mode] + ([f"K{key.K}"] if len(config["grid"]["K"]) > 1 else [])
    for _, options in _axes(config, key.method, key.mode):
        if len({name for name, _ in options}) > 1:
            parts += [name for name, option in options if name and all(settings[n] == v for n, v in option.items())][:1]
    return " ".join(parts + [f"s{key.seed}"])


def clocks(config: dict[str, Any]) -> set[str]:
    """The clocks of the grid's engines (``EngineSpec.clock``): its time figures."""
    return {engines.of(job_config(config, key)).clock for key in runs(config)}


def swept_axes(config: dict[str, Any]) -> set[str]:
    """The axes on which some job of the grid differs from the base settings (its ``varied``)."""
    return {axis for key in runs(config) for axis in job_config(config, key)["run"]["varied"]}


def job_config(config: dict[str, Any], key: RunKey) -> dict[str, Any]:
    """The resolved, validated config of one job."""
    methods.check(key.method)
    known = methods.names()
    for name in config.get("overrides", {}):
        if name not in known:  # a misspelt method's settings would be ignored without a word
            raise UserError(f"config key 'overrides.{name}': unknown method '{name}' (known: {', '.join(known)})")
    traits = methods.traits(key.method)
    if key.mode == "async" and traits.sync_only:
        raise UserError(f"method '{key.method}' has no async mode")
    shared = {k: v for k, v in config.items() if k not in NOT_JOB_SETTINGS}
    merged = config_lib.deep_merge(shared, config.get("overrides", {}).get(key.method, {}))
    job = _validate_job_sections(merged, key)
    grid = config.get("grid", {})
    found = variants({**job, "grid": grid}, key.method, key.mode)
    if key.variant not in found:
        raise UserError(f"job {key.name}: variant '{key.variant}' is not in the grid (it has: {', '.join(found)})")
    settings = found[key.variant]
    # Which swept settings differ from the config's base values: the report compares runs
    # along one axis at a time (e.g. accuracy vs slowdown with everything else at base).
    varied = ["K"] if grid.get("K") and key.K != grid["K"][0] else []
    base = {**{n: job["async"][n] for n in ("slowdown_factor", "slowed_module", "buffer_size", "budget")}, "beta": job["train"]["beta"],
            "groups": job["model"]["groups"], "quantize": job["model"]["quantize"], "synth_last_block": job["train"]["synth_last_block"]}
    varied += sorted({"slowdown" if n.startswith("slow") else n for n, v in settings.items() if v != base[n]})
    for name in ("slowdown_factor", "slowed_module", "buffer_size", "budget"):
        if name in settings:
            job["async"][name] = settings[name]
    for name in ("beta", "synth_last_block"):
        if name in settings:
            job["train"][name] = settings[name]
    for name in ("groups", "quantize"):
        if name in settings:
            job["model"][name] = settings[name]
    if job["train"]["gradient_delay"] is None and traits.gradient_delay is not None:
        job["train"]["gradient_delay"] = traits.gradient_delay  # so that it is logged as used
    _check_run(job, key)
    _drop_settings_that_do_not_apply(job, key)
    job["run"] = {"method": key.method, "mode": key.mode, "K": key.K, "variant": key.variant, "seed": key.seed, "varied": varied}
    return job


def _drop_settings_that_do_not_apply(job: dict[str, Any], key: RunKey) -> None:
    """Remove from ``job`` what its method and mode never read (the methods' ``reads`` traits)."""
    if key.mode == "async":
        del job["train"]["gradient_delay"]  # the engine's queues delay the gradients
    else:
        del job["async"]
    for path, readers in methods.settings_of().items():
        section, name = path.split(".")
        if key.method not in readers and section in job:
            job[section].pop(name, None)


def params_of(job: dict[str, Any]) -> dict[str, Any]:
    """A job's settings as MLflow params (``train.lr``, ...): those its network and schedule read,
    by the schema's ``x-applies-when``; a ResNet's shortcut is not a CNN run's param, nor are a
    multistep schedule's milestones a cosine run's."""
    flat = config_lib.flatten(job)
    family = shapes.parse(job["model"])[0] if "model" in job else None

    def applies(name: str) -> bool:
        section, _, key = name.partition(".")
        described = config_lib.schema()["properties"].get(section, {}).get("properties", {}).get(key, {})
        for path, allowed in described.get("x-applies-when", {}).items():  # e.g. {train.lr_schedule: [multistep]}
            value = family if path == "model.arch" else flat.get(path)
            if value in allowed["not"] if isinstance(allowed, dict) else value not in allowed:
                return False
        return True

    return {name: value for name, value in flat.items() if applies(name)}


def _check_run(job: dict[str, Any], key: RunKey) -> None:
    if not engines.of(job).runs_locked and methods.traits(key.method).sync_only:
        raise UserError(
            f"config key 'engine': method '{key.method}' has no {job['engine']} form (its modules wait for one backward pass;"
            f" benchmarks/parallel_speedup.py runs it as a GPipe pipeline): add overrides: {{{key.method}: {{engine: simulated}}}}"
        )
    widths = _layer_channels(job["model"])
    n_layers, arch = len(widths), job["model"]["arch"]
    layers_of = "model.widths" if arch == "cnn" else f"model.arch {arch}"
    pools = job["model"]["pools"]
    if arch == "cnn" and pools is not None and len(pools) != n_layers:
        raise UserError(f"config key 'model.pools': {len(pools)} entries for {n_layers} layers (model.widths)")
    if key.K > n_layers:
        raise UserError(f"config key 'grid.K': K={key.K} modules need at least {key.K} layers, {layers_of} has {n_layers}")
    split = job["model"]["split"]
    if isinstance(split, list) and (len(split) != key.K or sum(split) != n_layers):
        raise UserError(
            f"config key 'model.split': {split} must list K={key.K} layer counts summing to {n_layers} ({layers_of});"
            f" it lists {len(split)} summing to {sum(split)}"
        )
    _check_groups_and_quantize(job, key)
    dataset_traits.check_augment(job["dataset"]["name"], job["train"]["augment"])
    if key.mode == "async":
        factor, module = job["async"]["slowdown_factor"], job["async"]["slowed_module"]
        if module is not None and module >= key.K:
            raise UserError(f"job {key.name}: slowed module {module} does not exist with K={key.K} (modules 0..{key.K - 1})")
        if factor > 1 and module is None:
            raise UserError(f"job {key.name}: slowdown factor {factor:g} needs a slowed module")


def _check_groups_and_quantize(job: dict[str, Any], key: RunKey) -> None:
    model = job["model"]
    widths = _layer_channels(model)
    grouped = "model.groups" in methods.traits(key.method).reads and model["groups"] > 1
    family = shapes.parse(model)[0]  # the arch is known good: _layer_channels read it
    if grouped and family not in ("cnn", "resnet"):
        raise UserError(f"config key 'model.groups': neuron groups are built for model.arch cnn and resnet only, not {model['arch']} (job {key.name})")
    if grouped and family == "resnet" and model["shortcut"] != "B":
        raise UserError(f"config key 'model.groups': a grouped ResNet projects its shortcuts: set model.shortcut B, as the GN-DGL code (job {key.name})")
    if grouped and any(w % model["groups"] for w in widths):
        raise UserError(f"config key 'model.groups': {model['groups']} groups must divide every layer's width {widths} (job {key.name})")
    spec = engines.of(job)
    if grouped and spec.processes == "per_module" and key.mode != spec.group_workers:
        raise UserError(f"job {key.name}: engine '{job['engine']}' runs a module's neuron groups (model.groups) as workers of their own in {spec.group_workers} mode only")
    if grouped and spec.processes == "per_module" and model["quantize"] is not None:
        raise UserError(f"job {key.name}: engine '{job['engine']}' does not quantize (model.quantize) what neuron groups (model.groups) send")
    quantize = model["quantize"]
    if isinstance(quantize, list) and len(quantize) != key.K - 1:
        raise UserError(f"config key 'model.quantize': {len(quantize)} entries, but K={key.K} modules have {key.K - 1} boundaries (job {key.name})")
    # the widths at the boundaries (a balanced split is measured later: then any width may be one)
    split = model["split"]
    counts = split if isinstance(split, list) else None if split == "balanced" else shapes.split_layers(len(widths), key.K)
    boundary_widths = [widths[sum(counts[: k + 1]) - 1] for k in range(key.K - 1)] if counts else widths[:-1]
    for k, q in enumerate(quantize if isinstance(quantize, list) else [quantize] * (key.K - 1)):
        width = boundary_widths[k] if counts else None
        if q is not None and any(w % q["dim"] for w in ([width] if width else boundary_widths)):
            raise UserError(f"config key 'model.quantize': dim {q['dim']} does not divide the {width or boundary_widths} channels at boundary {k} (job {key.name})")


def _layer_channels(model_cfg: dict[str, Any]) -> list[int]:
    try:
        return shapes.channels(model_cfg)
    except ValueError as e:
        raise UserError(f"config key 'model.arch': {e}") from None


def job_threads(job: dict[str, Any]) -> int:
    """CPU threads a job uses: its intra-op threads, in each of its processes."""
    return engines.of(job).process_count(job) * job["train"]["threads"]


def check_job(job: dict[str, Any]) -> dict[str, Any]:
    """Re-validate a job config handed to the CLI (e.g. by a Snakemake rule, or written by hand)."""
    if not isinstance(job, dict) or not isinstance(job.get("run"), dict):
        raise UserError("job config needs a 'run' mapping with method, mode, K, variant and seed")
    run = job["run"]
    missing = [k for k in ("method", "mode", "K", "seed") if k not in run]
    if missing:
        raise UserError(f"job config key 'run' lacks {', '.join(missing)}")
    key = RunKey.of(run)
    config = {k: v for k, v in job.items() if k != "run"}
    config["grid"] = {"methods": [key.method], "modes": [key.mode], "K": [key.K], "seeds": [key.seed]}
    checked = job_config(config_lib.validate(config), key)
    checked["run"]["varied"] = run.get("varied", [])  # relative to the experiment, which a job does not hold
    return checked


def _validate_job_sections(merged: dict[str, Any], key: RunKey) -> dict[str, Any]:
    """Validate the merged sections as a one-point experiment, so overrides get the same checks."""
    as_experiment = dict(merged, grid={"methods": [key.method], "modes": [key.mode], "K": [key.K], "seeds": [key.seed]})
    try:
        validated = config_lib.validate(as_experiment)
    except UserError as e:
        raise UserError(f"{e} (in the job {key.name}, after overrides.{key.method})") from None
    for name in NOT_JOB_SETTINGS:
        validated.pop(name, None)
    for other in engines.names():  # another engine's section: its settings never re-run this job
        section = engines.spec(other).section
        if section is not None and other != validated["engine"]:
            validated.pop(section, None)
    return validated
