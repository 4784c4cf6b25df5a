"""Turn finished training runs into tables and figures.

Each run directory (``results/runs/{method}/{mode}/K{K}/{variant}/seed{seed}/``) holds
``metrics.json`` from training and ``eval.json`` from the separate evaluation of the final
checkpoint. The report reads both, so a reader can check every number in the tables against the
files it came from. Headline accuracy comes from ``eval.json`` (the final checkpoint); the
learning curves and the time to reach a target accuracy come from the per-epoch records in
``metrics.json``.

A run's *variant* names its swept settings (``S4m1_B10``: slowdown 4 on module 1, buffer 10)
and ``varied`` lists the swept axes on which it differs from the experiment's base values.
Runs with ``varied == []`` are the *reference* runs: the main table and the learning curves use
only those, and each sweep figure uses the runs that differ along its own axes only.

Bad input (a missing file, broken JSON, a missing key) is the user's to fix, so it raises
``UserError`` with one line naming the file rather than a pandas traceback.

This module must not import matplotlib: the workflow imports it for the output names below.
"""

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from decoupled import engines, grid, methods
from decoupled.errors import UserError
from decoupled.files import read_json
from decoupled.layout import FIGURE_NAMES, TABLE_NAMES, figures_for

__all__ = ["load_runs", "build_report", "add_time_to_accuracy", "time_to_accuracy_column",
           "DEFAULT_TARGET_ACCURACY", "TABLE_NAMES", "FIGURE_NAMES", "METHOD_ORDER", "MODE_ORDER", "AXES"]

# The methods' order in tables and figures (their report_order traits: the paper's order); any
# other method follows, alphabetically.
METHOD_ORDER = methods.report_order()
MODE_ORDER = ["sync", "async"]
# The swept axes a run may differ on (its ``varied`` list is a subset).
AXES = ["K", "slowdown", "buffer_size", "budget", "beta", "groups", "quantize", "synth_last_block"]
# The schema's default for ``report.target_accuracy``, for callers without a config (a test
# checks that the two agree).
DEFAULT_TARGET_ACCURACY = 0.85
# What runs wrote before metrics.json named its engine: the simulated one was the only one.
DEFAULT_ENGINE = "simulated"
# What a run's seconds (its time to accuracy, its time axis) are: a simulated run's parallel
# time (each module's measured work on a worker of its own, waits included), real workers'
# wall clock, or, for runs written before the simulated engines kept a parallel clock, one
# process doing every module's work in turn.
SIMULATED_PARALLEL, WALL_CLOCK, ONE_PROCESS = "simulated parallel", "wall clock", "one process"
# Bits per activation of a boundary that sends floats (float32), where quantized boundaries
# send bits/dim (model.quantize).
FLOAT_BITS = 32

# Runs of two engines may share a run directory layout (two experiments), so the engine is
# part of what tells runs apart.
_RUN_KEYS = ["method", "mode", "K", "variant", "seed", "engine"]
_STALENESS = ["input_staleness", "grad_staleness"]


def build_report(run_dirs: Iterable[Path], tables_dir: Path, figures_dir: Path,
                 target_accuracy: float = DEFAULT_TARGET_ACCURACY, report_cfg: dict | None = None,
                 left_out: list[tuple[Path, str]] | None = None, claims: list | None = None,
                 planned: set[tuple[str, str]] | None = None) -> list[Path]:
    """Load the runs, write every table and the figures they have data for (``layout``: a
    sweep figure only when some run varies its axis); return every path written.

    ``target_accuracy`` (a fraction) is the test accuracy whose time to reach the tables give
    and the wall-time figure marks. ``report_cfg`` (the config's ``report``): with
    ``published`` numbers, the reproduction table ``paper_vs_ours`` too. ``claims`` (the
    config's, resolved: ``decoupled.claims.of``): the claims table, each checked from the runs.
    ``planned``: the experiment's (method, mode) pairs, so that the main table tells a mode it
    does not run from one not yet run. ``left_out``: see ``load_runs``.
    """
    # Imported here so that loading runs (e.g. from a notebook) never touches matplotlib or
    # switches its backend.
    import inspect

    from decoupled.report import figures, tables

    runs_df, epochs_df = load_runs(list(run_dirs), left_out)
    runs_df = add_time_to_accuracy(runs_df, epochs_df, target_accuracy)
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    written = tables.write_summary(tables.summary(runs_df), tables_dir)
    written += tables.write_main(tables.main_table(runs_df), tables_dir, planned)
    if claims:
        from decoupled.report import verdicts

        written += verdicts.write(verdicts.evaluate(runs_df, claims), tables_dir)
    if report_cfg and report_cfg.get("published"):
        reproduction = tables.paper_vs_ours(runs_df, report_cfg["published"], report_cfg.get("reduced_run", False))
        written += tables.write_paper_vs_ours(reproduction, tables_dir)
    # each plot function takes what it needs of these, by name
    given = {"runs_df": runs_df, "epochs_df": epochs_df, "figures_dir": figures_dir, "target_accuracy": target_accuracy}
    for figure in figures_for(swept_axes(runs_df), engine_clocks(runs_df)):
        plot = getattr(figures, figure.writer)
        written += plot(**{name: given[name] for name in inspect.signature(plot).parameters})
    return written


def engine_clocks(runs_df: pd.DataFrame) -> set[str]:
    """The clocks the runs' engines keep (a run from before the simulated parallel clock too:
    its engine's time figure says it is left out)."""
    return {engines.spec(engine).clock for engine in runs_df["engine"]} if len(runs_df) else set()


def swept_axes(runs_df: pd.DataFrame) -> set[str]:
    """The axes on which some run differs from the base settings."""
    return {axis for varied in runs_df["varied"] for axis in varied} if len(runs_df) else set()


def time_to_accuracy_column(target_accuracy: float) -> str:
    """``time_to_85pct_s`` for 0.85: the column's name says which target its seconds are for."""
    return f"time_to_{100 * target_accuracy:g}pct_s"


def add_time_to_accuracy(runs_df: pd.DataFrame, epochs_df: pd.DataFrame,
                         target_accuracy: float) -> pd.DataFrame:
    """``runs_df`` (from ``load_runs``) with a ``time_to_{X}pct_s`` column (X = 100 × target).

    A run's value is the ``time_s`` (on the run's ``clock``) of its first epoch whose test
    accuracy reaches the target, NaN if none does. Epoch resolution: the target may have been crossed earlier within
    that epoch, but the accuracy is only measured at the end of each.
    """
    # Written so that NaN is refused too: every comparison with it is false.
    if not 0 < target_accuracy <= 1:
        raise UserError(f"target accuracy must be a fraction in (0, 1], got {target_accuracy}")
    reached = epochs_df[epochs_df["test_acc"] >= target_accuracy].sort_values("epoch")
    first = reached.groupby(_RUN_KEYS)["time_s"].first().rename("_reached_at")
    times = runs_df.join(first, on=_RUN_KEYS)["_reached_at"]
    return runs_df.assign(**{time_to_accuracy_column(target_accuracy): times.astype(float)})


def method_rank(method: str) -> tuple[int, str]:
    """Sort key putting methods in the paper's order, unknown ones after, alphabetically; a
    method's other form ("dni nolastsynth") right after the method."""
    name, _, form = method.partition(" ")
    return (METHOD_ORDER.index(name), form) if name in METHOD_ORDER else (len(METHOD_ORDER), method)


def method_label(method: str, settings: dict) -> str:
    """The name a run's method goes by in the tables and figures: its own name for the form its
    paper ran, followed by the variant part that names any other form ("dni nolastsynth": the
    last block on the true loss), so that the two are never averaged or read as one."""
    last = settings.get("synth_last_block")
    if last is None and method in methods.names() and "train.synth_last_block" in methods.traits(method).reads:
        last = False  # trained before the option existed, in the form without it
    form = "" if last is None else grid.method_form(last)[0]
    return f"{method} {form}" if form else method


def method_of(label: str) -> str:
    """The method behind a label of ``method_label``."""
    return label.partition(" ")[0]


def mode_rank(mode: str) -> tuple[int, str]:
    """Sort key putting sync before async, any other mode after, alphabetically."""
    return (MODE_ORDER.index(mode), "") if mode in MODE_ORDER else (len(MODE_ORDER), mode)


def load_runs(run_dirs: list[Path], left_out: list[tuple[Path, str]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read run directories into a per-run frame and a per-epoch frame.

    A run whose files cannot be read (missing, malformed, or an eval.json saying its checkpoint
    could not be read) is a UserError naming the file; with a ``left_out`` list, it is left out
    instead, the damaged file and that message appended to the list, so that one damaged run
    does not take the others' tables with it (a UserError still if no run is left).

    Per-run columns: method, mode, K, variant, seed, engine (an engine of ``decoupled.engines``;
    "simulated" where metrics.json predates its ``engine`` key), varied (list), test_acc,
    test_acc_per_module (list), train_time_s (the process's seconds), clock (what ``time_s``
    measures: "simulated parallel", "wall clock" or "one process"), time_s (at the end of
    training, on that clock), epochs (count), images_per_s (mean over epochs), slowdown_factor,
    slowed_module, buffer_size, budget, beta, gradient_delay, groups, quantize_bits_per_activation
    (missing where they do not apply), bits_per_activation (what one activation costs to send:
    ``FLOAT_BITS`` where no boundary quantizes, bits/dim where every one quantizes alike, NaN
    where the boundaries differ), bytes_per_image (the last epoch's), max_worker_macs and
    workers (``decoupled.compute``; missing in runs from before they were counted),
    steps_per_module (list, summed over epochs; None where metrics.json lacks it),
    finish_time_s_per_module (when each module made its last step, on the run's clock; None
    where absent), and for async runs (None otherwise) input_staleness_mean /
    grad_staleness_mean (lists from the last epoch, since they are cumulative; an entry is None
    for a module that consumed nothing of that kind).
    Per-epoch columns: method, mode, K, variant, seed, engine, varied, epoch, test_acc,
    train_loss, wall_time_s (the process's cumulative training seconds at the end of the
    epoch), time_s (the same on the run's clock) and clock.
    """
    if not run_dirs:
        raise UserError("no run directories given to the report")
    run_rows, epoch_rows = [], []
    seen: dict[tuple, Path] = {}
    for run_dir in map(Path, run_dirs):
        try:
            run, epochs = _load_run(run_dir)
        except UserError as e:
            if left_out is None:
                raise
            left_out.append((_damaged_file(run_dir, str(e)), str(e)))
            continue
        key = tuple(run[k] for k in _RUN_KEYS)
        # Two directories claiming the same run would be silently averaged as two seeds.
        if key in seen:
            raise UserError(f"{run_dir}: same method/mode/K/variant/seed/engine as {seen[key]}")
        seen[key] = run_dir
        run_rows.append(run)
        epoch_rows.extend(epochs)
    if not run_rows:
        raise UserError(f"none of the {len(run_dirs)} runs can be read: {left_out[0][1]}")
    runs_df = pd.DataFrame(run_rows)
    # Integers that may be missing: nullable, so 1 stays "1" rather than becoming "1.0".
    for col in ("slowed_module", "buffer_size", "gradient_delay", "groups", "workers"):
        runs_df[col] = runs_df[col].astype("Int64")
    for col in ("slowdown_factor", "beta", "quantize_bits_per_activation", "bits_per_activation", "bytes_per_image", "max_worker_macs"):
        runs_df[col] = runs_df[col].astype(float)
    return runs_df, pd.DataFrame(epoch_rows)


def _damaged_file(run_dir: Path, message: str) -> Path:
    """The file of a run that ``message`` (``_load_run``'s) is about: the one it names first, or
    the checkpoint, when eval.json says it could not be evaluated."""
    if message.startswith(str(run_dir / "eval.json")) and str(run_dir / "checkpoint.pt") in message:
        return run_dir / "checkpoint.pt"
    return run_dir / "eval.json" if message.startswith(str(run_dir / "eval.json")) else run_dir / "metrics.json"


def _load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """Validate one run's two files and flatten them into a run row and epoch rows."""
    metrics_path, eval_path = run_dir / "metrics.json", run_dir / "eval.json"
    metrics, evaluation = read_json(metrics_path), read_json(eval_path)
    if "error" in evaluation:  # its checkpoint could not be evaluated (decoupled evaluate)
        raise UserError(f"{eval_path}: {evaluation['error']}")
    ident, engine, varied = _identity(metrics, evaluation, metrics_path, eval_path)
    K, is_async = ident["K"], ident["mode"] == "async"
    settings = _settings(_get(metrics, "settings", dict, metrics_path), is_async, metrics_path)
    ident["method"] = method_label(ident["method"], settings)
    epochs = _get(metrics, "epochs", list, metrics_path)
    if not epochs:
        raise UserError(f"{metrics_path}: 'epochs' is empty")
    clock = engines.spec(engine).clock  # what the engine's seconds are (its SPEC)
    if clock == SIMULATED_PARALLEL and "sim_time_s" not in epochs[0]:
        clock = ONE_PROCESS  # a simulated run from before the parallel clock
    epoch_rows, speeds, steps = _epoch_rows(epochs, {**ident, "engine": engine, "varied": list(varied)}, clock, is_async, metrics_path)
    finish = epochs[-1].get("finish_time_s_per_module")
    if finish is not None and (not isinstance(finish, list) or len(finish) != K or not all(_is_number(t) for t in finish)):
        raise UserError(f"{metrics_path}: epochs[{len(epochs) - 1}]: 'finish_time_s_per_module' must be {K} numbers")

    per_module = _get(evaluation, "test_acc_per_module", list, eval_path)
    if len(per_module) != K or not all(_is_number(a) for a in per_module):
        raise UserError(f"{eval_path}: 'test_acc_per_module' must be {K} numbers")

    run_row = {
        **ident,
        "engine": engine,
        "varied": list(varied),
        "test_acc": _get(evaluation, "test_acc", float, eval_path),
        "test_acc_per_module": [float(a) for a in per_module],
        "train_time_s": _get(metrics, "train_time_s", float, metrics_path),
        "clock": clock,
        "time_s": epoch_rows[-1]["time_s"],
        "epochs": len(epochs),
        "images_per_s": sum(speeds) / len(speeds),
        **settings,
        "steps_per_module": steps,
        "finish_time_s_per_module": None if finish is None else [float(t) for t in finish],
        "bits_per_activation": _bits_per_activation(settings["quantize_bits_per_activation"], epochs[-1]),
        # what every module sent per image read, forward and back (None: not counted)
        "bytes_per_image": epochs[-1].get("bytes_per_image"),
        # the largest forward MACs per image of one worker, and how many workers (decoupled.compute)
        "max_worker_macs": metrics.get("compute", {}).get("max_worker_macs"),
        "workers": metrics.get("compute", {}).get("workers"),
    }
    for kind in _STALENESS:
        # Cumulative since the start of the run, so the last epoch holds the whole run.
        run_row[f"{kind}_mean"] = (
            _staleness_means(epochs[-1], kind, K, f"{metrics_path}: epochs[{len(epochs) - 1}]")
            if is_async else None)
    return run_row, epoch_rows


def _bits_per_activation(uniform_bits: float | None, last_epoch: dict) -> float:
    """Bits per activation sent between modules: ``uniform_bits`` (bits/dim of the quantizer
    every boundary uses), else floats' bits unless some boundary quantizes (its last epoch then
    has the quantizer's numbers per boundary): NaN, boundaries that differ have no one value."""
    if uniform_bits is not None:
        return uniform_bits
    quantized = any(error is not None for error in last_epoch.get("vq_recon_error_per_boundary") or [])
    return math.nan if quantized else float(FLOAT_BITS)


def _identity(metrics: dict, evaluation: dict, metrics_path: Path, eval_path: Path) -> tuple[dict, str, list]:
    """A run's method, mode, K, variant and seed (the same in both files), engine and varied axes."""
    ident = {
        "method": _get(metrics, "method", str, metrics_path),
        "mode": _get(metrics, "mode", str, metrics_path),
        "K": _get(metrics, "K", int, metrics_path),
        "variant": _get(metrics, "variant", str, metrics_path),
        "seed": _get(metrics, "seed", int, metrics_path),
    }
    # eval.json is written by a separate step; a mismatch means it was copied from another run.
    for key, value in ident.items():
        if _get(evaluation, key, type(value), eval_path) != value:
            raise UserError(f"{eval_path}: {key} does not match {metrics_path}")
    # Not in eval.json (evaluation is the same whichever engine trained), so not checked there.
    engine = _get(metrics, "engine", str, metrics_path) if "engine" in metrics else DEFAULT_ENGINE
    if engine not in engines.names():
        raise UserError(f"{metrics_path}: unknown engine '{engine}' (known: {', '.join(engines.names())})")
    varied = _get(metrics, "varied", list, metrics_path)
    if not all(isinstance(v, str) and v in AXES for v in varied):
        raise UserError(f"{metrics_path}: 'varied' must list some of {', '.join(AXES)}, got {varied!r:.60}")
    return ident, engine, varied


def _epoch_rows(epochs: list, common: dict, clock: str, is_async: bool, metrics_path: Path) -> tuple[list[dict], list[float], list[int] | None]:
    """One row per epoch record (with ``common``: the run's identity; ``clock``: what its seconds
    are), the images/s of each, and the steps each module made in all (None where runs did not
    count them)."""
    K = common["K"]
    epoch_rows, speeds, steps = [], [], [0] * K
    for i, record in enumerate(epochs):
        where = f"{metrics_path}: epochs[{i}]"
        if not isinstance(record, dict):
            raise UserError(f"{where} is not an object")
        wall = _get(record, "wall_time_s", float, where)
        epoch_rows.append({
            **common,
            "varied": list(common["varied"]),
            "epoch": _get(record, "epoch", int, where),
            "test_acc": _get(record, "test_acc", float, where),
            # null: the last module made no step that epoch (async, done early)
            "train_loss": math.nan if record.get("train_loss", 0) is None else _get(record, "train_loss", float, where),
            "wall_time_s": wall,
            "time_s": _get(record, "sim_time_s", float, where) if clock == SIMULATED_PARALLEL else wall,
            "clock": clock,
        })
        speeds.append(_get(record, "images_per_s", float, where))
        if steps is not None and ("steps_per_module" in record or is_async):
            epoch_steps = _get(record, "steps_per_module", list, where)
            if len(epoch_steps) != K or not all(_is_int(s) for s in epoch_steps):
                raise UserError(f"{where}: 'steps_per_module' must be {K} integers")
            steps = [a + b for a, b in zip(steps, epoch_steps)]
        else:
            steps = None  # written before sync runs counted their steps
    return epoch_rows, speeds, steps


def _settings(settings: dict, is_async: bool, where: Path) -> dict:
    """The swept settings the report uses, each a value or None (null: does not apply)."""
    kinds = {"slowdown_factor": float, "slowed_module": int, "buffer_size": int, "beta": float, "budget": str, "gradient_delay": int,
             "groups": int, "quantize_bits_per_activation": float, "synth_last_block": bool}
    optional = ("budget", "gradient_delay", "groups", "quantize_bits_per_activation", "synth_last_block")  # absent from runs written before they existed
    out = {}
    for key, kind in kinds.items():
        if key not in settings and key not in optional:
            raise UserError(f"{where}: missing key 'settings.{key}'")
        value = settings.get(key)
        if value is not None:
            value = _get(settings, key, kind, f"{where}: settings")
        elif is_async and key in ("slowdown_factor", "buffer_size"):
            # The sweep figures place every async run by these two.
            raise UserError(f"{where}: 'settings.{key}' must be set for an async run")
        out[key] = value
    return out


def _staleness_means(record: dict, kind: str, K: int, where: str) -> list[float | None]:
    summaries = _get(record, kind, list, where)
    if len(summaries) != K or not all(isinstance(s, dict) and "mean" in s for s in summaries):
        raise UserError(f"{where}: '{kind}' must be {K} objects with a 'mean'")
    means = [s["mean"] for s in summaries]
    if not all(m is None or _is_number(m) for m in means):
        raise UserError(f"{where}: '{kind}' means must be numbers or null")
    return [None if m is None else float(m) for m in means]


def _get(data: dict, key: str, kind: type, where: object):
    """Fetch ``data[key]`` checked against ``kind`` (``float`` also accepts JSON integers)."""
    if key not in data:
        raise UserError(f"{where}: missing key '{key}'")
    value = data[key]
    ok = _is_number(value) if kind is float else (
        _is_int(value) if kind is int else isinstance(value, kind))
    if not ok:
        raise UserError(f"{where}: '{key}' must be {kind.__name__}, got {value!r:.40}")
    return float(value) if kind is float else value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `true` as an accuracy is a bug upstream, not a number.
    # NaN is allowed: a diverged run's loss is a real result worth reporting.
    return isinstance(value, (int, float)) and not isinstance(value, bool)
