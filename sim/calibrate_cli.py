"""`twinfer profile` (measure the executor, fit a cost model, write a profile) and `twinfer validate`
(the same workload in the simulator and on the executor, side by side)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_NUM_BLOCKS = 4096


def register(sub: argparse._SubParsersAction) -> None:
    from sim.cli import add_sim_flags, add_trace_flags

    p = sub.add_parser(
        "profile", help="measure the executor's step times on a grid of shapes and fit a cost model",
        description="Run the executor's model runner on a grid of step shapes (decode batches at several "
                    "context lengths, prefill chunks, mixed steps) on this device, take the median of N timed "
                    "runs per shape after a warm-up, fit a non-negative cost model on most shapes, report its "
                    "error on the held-back rest, measure the engine loop's time between steps on a short real "
                    "replay, and write a profile file for `--profile FILE`.")
    p.add_argument("--model-config", default="default",
                   help="executor model: a preset (weights from --seed) or a local Hugging Face Llama directory "
                        "(config.json + safetensors) (default: default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--out", required=True, help="profile file to write (.toml or .json)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per shape (default 7; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per shape first (default 2)")
    p.add_argument("--quick", action="store_true", help="a small grid (under a minute on a 2-core CPU)")
    p.add_argument("--holdout", type=float, default=None, help="share of shapes held back to measure the fit's "
                                                               "error (default 0.25; with --refit, the profile's)")
    p.add_argument("--form", default="auto", choices=("auto", "linear", "max"),
                   help="cost formula: linear, max of two lines, or auto (the max only if clearly better)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on the CPU (default 1). The executor's replay gives each of R "
                        "replicas cores // R threads: profile with the count the validation will run")
    p.add_argument("--num-blocks", type=int, default=DEFAULT_NUM_BLOCKS,
                   help=f"KV blocks the executor gives a replica: the profile's KV capacity (default "
                        f"{DEFAULT_NUM_BLOCKS})")
    p.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest step in tokens on the grid (default 2048)")
    p.add_argument("--concurrent", type=int, default=1,
                   help="measure the grid as one of N co-located replicas: alone, and beside N - 1 neighbour "
                        "processes running one kind of step at a time (few-sequence decodes, decode batches, "
                        "prefills) or random grid shapes, interleaved round by round (default 1: alone only). "
                        "For replicas that share a machine: validate then times each simulated step by what "
                        "the other replicas have in progress (sim/contention.py)")
    p.add_argument("--seed", type=int, default=None,
                   help="model weights, hold-out choice and run order (default 0; with --refit, the profile's)")
    p.add_argument("--no-loop-overhead", dest="loop_overhead", action="store_false", default=True,
                   help="do not replay on the executor to measure its serving loop: the engine loop's time between "
                        "steps (a short burst; added to every predicted step), what a step costs right after "
                        "the replica was idle (spaced requests, about 20 s) and its steps with prefill tokens against "
                        "its decode steps (a calibration mix, about a minute)")
    p.add_argument("--from-steps", metavar="STEPS_CSV",
                   help="fit on an engine step log (steps.csv of `twinfer run --out`) instead of measuring a grid; "
                        "--model-config and --num-blocks still describe the executor it came from")
    p.add_argument("--refit", metavar="PROFILE",
                   help="measure nothing: fit a profile's stored grid medians again with this twinfer's fit (and "
                        "--form / --knee) and write the result to --out; the hold-out share and seed stay the "
                        "profile's unless given, so the held-out errors compare")
    p.add_argument("--knee", default="auto", type=_knee_arg,
                   help="padded decode tokens past which the fit may add a steeper slope (a step whose attention "
                        "outgrows a cache): auto (cross-validated on the training shapes; kept only if clearly "
                        "better), none, or a number of tokens (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(func=cmd_profile)

    v = sub.add_parser(
        "validate", help="replay a workload in the simulator (--profile FILE) and on the executor; compare",
        description="Run the same workload and configuration through the simulator with a fitted profile and "
                    "through the real executor in real time, and print p50/p90/p99 TTFT, TPOT, E2E and "
                    "queueing, and throughput, side by side with the simulator's relative error. With "
                    "--repeat N the executor runs N times and errors inside its own min..max are marked.")
    v.add_argument("--config", help="TOML file with cluster/policy settings (flags override it)")
    add_trace_flags(v)
    add_sim_flags(v)
    g = v.add_argument_group("executor")
    g.add_argument("--model-config", default=None,
                   help="executor model: a preset or a local Hugging Face Llama directory (default: the profile's)")
    g.add_argument("--device", default=None, help="executor device (default: the profile's, else cpu)")
    g.add_argument("--repeat", type=int, default=1, help="real runs (default 1); >= 2 reports their spread")
    g.add_argument("--time-limit", type=float, default=600.0,
                   help="s after the last arrival before unfinished requests fail (default 600)")
    g.add_argument("--drift-check", dest="drift_check", action=argparse.BooleanOptionalAction, default=None,
                   help="right before and right after the real run(s), re-time a few reference shapes of the "
                        "profile's own grid in this process (the executor's model, alone, the profile's thread "
                        "count; about 2 s each) and scale the simulator's step times by the geometric mean of "
                        "now / profiled: the machine's current speed, never the run's own steps. On by default "
                        "because a CPU's speed drifts by 10 %% and more between runs (measured here: one decode "
                        "shape 23.7 -> 34.6 ms over an hour), which a profile measured once cannot follow and "
                        "which moves p50 latencies more than the simulator's own error; the uncorrected "
                        "prediction is still reported. Needs a profile with grid measurements. Off by default on "
                        "CUDA: on an H100 the check read 0.64-1.31 x the profile while the replicas' own steps "
                        "ran 0.95-1.05 x it")
    g.add_argument("--busy-drift-check", dest="busy_drift_check", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="with co-located replicas and a profile measured with --concurrent N: also re-time the "
                        "reference shapes beside N - 1 neighbour processes running the profile's decode batches, "
                        "against the profile's medians beside the same, and correct the contention factors by "
                        "how much more (or less) the replicas slow each other now than when profiled (about 15 s "
                        "each, a 6 s warm-up included; on a VM the shared cores' speed under load moves by "
                        "itself). Off by default: on a day the machine's co-location behaved as profiled it "
                        "added its own noise (fidelity matrix: median p50 errors 5.4 / 5.9 / 4.6 %% with the "
                        "alone check only, 5.8 / 7.4 / 5.2 %% with it). With it, the prediction with the alone "
                        "check only and the uncorrected one are still reported")
    g.add_argument("--loop-drift-check", dest="loop_drift_check", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="measure the machine's pace where the replicas run: before and after the real run(s), "
                        "replay a short mix (24 requests with the workload's prompt and output lengths under its "
                        "configuration and rate, see --loop-mix; 10-60 s each on a 2-core CPU) on the same "
                        "replicas, read their steps' "
                        "time against the cost model, and scale the prediction by the geometric mean of the two. "
                        "With it, that prediction is the headline and the reference-shape check's is reported "
                        "beside it. On by default where the drift check is (the CPU): in four 24-cell fidelity "
                        "runs it read the cells' step pace better every time (median miss 3.5-4.1 %% against "
                        "3.9-6.9 %%)")
    g.add_argument("--loop-mix", choices=LOOP_MIXES, default="cell",
                   help="the loop drift check's requests: 'cell' (default), 24 whose prompt and output lengths are "
                        "drawn from the workload's own (a fixed seed; none of its outcomes), replayed the way the "
                        "workload is: its scheduler, router and arrivals (see --loop-arrivals), so the check "
                        "reads the pace of the workload's step shapes, batch sizes and co-location "
                        "(the model's error differs by a few percent from one of those to another; at a low rate "
                        "fewer requests, down to 8, so a check's arrivals span about a minute at most); "
                        "'workload', the same lengths at 60 %% of capacity under chunked prefill and round robin; "
                        "'calibration', 24 of log-uniform lengths that way, nothing from the workload")
    g.add_argument("--loop-arrivals", choices=LOOP_ARRIVALS, default="gaps",
                   help="how the 'cell' mix's requests arrive: 'gaps' (default), gaps drawn from the workload's own "
                        "inter-arrival gaps (a fixed seed; each cut to 5 s), so a bursty workload's check is bursty "
                        "too; 'poisson', Poisson at the workload's mean rate (the default up to fidelity run Z2: "
                        "a code-trace slice that arrives in one burst then ran 1-4 %% faster than its checks read)")
    g.add_argument("--loop-also", choices=LOOP_MIXES, default=None,
                   help="with the loop drift check: run a second check with this mix before and after as well, "
                        "and report its prediction beside the headline (a comparison of two mixes on the same "
                        "real runs)")
    o = v.add_argument_group("output")
    o.add_argument("--out", help="JSON file for the comparison, both summaries and the settings")
    o.add_argument("--json", action="store_true", help="print the comparison as JSON")
    o.add_argument("--records", metavar="PREFIX",
                   help="write per-request records: the headline prediction's to PREFIX.sim.csv, the prediction at "
                        "the real run's step pace to PREFIX.paced.csv, real run K's to PREFIX.real.K.csv (same "
                        "columns, matched by id)")
    o.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    v.set_defaults(func=cmd_validate)


# ---- profile --------------------------------------------------------------------------------

def _knee_arg(v: str) -> int | None | str:
    if v in ("auto", "none"):
        return None if v == "none" else v
    try:
        k = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r}: auto, none or a whole number of tokens >= 1") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: auto, none or a whole number of tokens >= 1")
    return k


def run_profile(model_config: str, device: str, repeats: int, warmup: int, quick: bool, holdout: float,
                form: str, threads: int | None, num_blocks: int, block_size: int, max_tokens: int, seed: int,
                progress: bool = False, concurrent: int = 1, loop_overhead: bool = True, knee: Any = "auto"):
    """Measure and fit; returns (Profile, FitResult)."""
    from executor.device import describe_device, select_device
    from executor.replay import resolve_model
    from executor.runner import ModelRunner
    from sim.calibrate import (
        BusyNeighbours, default_grid, grid_blocks_needed, measure_grid, measure_loop_overhead,
        mix_replay, prefill_factor_from_steps, profile_from_measurements, steps_features, wake_from_steps, wake_replay,
    )
    from sim.contention import step_predictions

    for name, val, lo in (("--repeats", repeats, 1), ("--warmup", warmup, 0), ("--num-blocks", num_blocks, 1),
                          ("--concurrent", concurrent, 1),
                          ("--block-size", block_size, 1), ("--max-tokens", max_tokens, 1)):
        if val < lo:
            raise ValueError(f"{name}={val} is out of range; allowed: >= {lo}")
    spec = resolve_model(model_config, seed)
    cfg = spec.cfg
    dev = select_device(device)
    if threads is None:
        threads = 1 if dev.type == "cpu" else None
    if threads is not None and threads < 1:
        raise ValueError(f"--threads={threads} is out of range; allowed: >= 1")
    points = default_grid(quick=quick, max_tokens=max_tokens, max_context=cfg.max_position, seed=seed,
                          max_kv_tokens=num_blocks * block_size)
    need = grid_blocks_needed(points, block_size)
    model = spec.build(str(dev))
    runner = ModelRunner(model, max(num_blocks, need), block_size, device=dev, num_threads=threads)
    threads = runner.num_threads
    def measure(label: str, pts=None):
        pts = points if pts is None else pts
        if not progress:
            return measure_grid(runner, pts, repeats, warmup, seed)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from sim.cli import _console

        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True, console=_console(stderr=True)) as prog:
            task = prog.add_task(label, total=len(pts) * (warmup + repeats))
            return measure_grid(runner, pts, repeats, warmup, seed,
                                progress=lambda i, n: prog.update(task, completed=i))

    t0 = time.perf_counter()
    busy = samples = None
    if concurrent > 1:
        # Co-located: alone, beside each kind of neighbour step, and beside random grid shapes (the classic
        # busy measurement), interleaved round by round (sim.contention)
        from sim.calibrate import Measurement
        from sim.contention import CONDITIONS, measure_interleaved, neighbour_groups

        measure_grid(runner, points, 1, warmup, seed)  # warm-up, discarded
        groups = neighbour_groups(points)
        busy_conds = [c for c in CONDITIONS if c != "idle"]
        conds = ["idle"] + [c for c in busy_conds if groups[c]]
        with BusyNeighbours(concurrent - 1, spec, points, block_size, need, threads, str(dev), seed,
                            groups=[groups[c] for c in busy_conds]) as nb:
            def once(pts, sd):
                return [m.samples[0] for m in measure_grid(runner, pts, 1, 0, sd)]

            def switch(c):
                nb.switch(-1 if c == "idle" else busy_conds.index(c))

            if progress:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                from sim.cli import _console

                label = f"profiling: alone and beside {concurrent - 1} neighbour(s), interleaved"
                with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              transient=True, console=_console(stderr=True)) as prog:
                    task = prog.add_task(label, total=repeats * len(conds))
                    samples = measure_interleaved(once, points, switch, repeats, seed, conds,
                                                  progress=lambda i, n: prog.update(task, completed=i))
            else:
                samples = measure_interleaved(once, points, switch, repeats, seed, conds)
        meas = [Measurement(p, s) for p, s in zip(points, samples["idle"])]
        busy = [Measurement(p, s) for p, s in zip(points, samples["grid"])]
    else:
        meas = measure("profiling")
    loop = wake_steps = wake_busy_steps = None
    if loop_overhead:
        del runner, model  # the replay builds its own replicas
        loop = measure_loop_overhead(model_config, concurrent, num_blocks, block_size, str(dev), seed)
        wake_steps = wake_replay(model_config, concurrent, num_blocks, block_size, str(dev), seed)
        wake_busy_steps = (wake_replay(model_config, concurrent, num_blocks, block_size, str(dev), seed,
                                       busy_neighbour=True) if concurrent >= 2 else None)
    elapsed = time.perf_counter() - t0
    info = describe_device(dev)
    info["torch_threads"] = threads if dev.type == "cpu" else info.get("torch_threads")
    load = _loadavg()
    name = f"{cfg.name}@{info.get('name', dev.type)}"
    prof, fit = profile_from_measurements(
        meas, num_blocks * block_size, holdout=holdout, form=form, seed=seed, name=name, device=info, knee=knee,
        model=model_record(spec),
        kv={"num_blocks": num_blocks, "block_size": block_size},
        measure={"repeats": repeats, "warmup": warmup, "threads": threads, "quick": quick,
                 "concurrent": concurrent,
                 "points": len(points), "seconds": elapsed, "timed": "ModelRunner.run (forward + sampling)",
                 "loadavg_1m": load,
                 "order": ("rounds over the neighbour's conditions (shuffled), all shapes under each (shuffled)"
                           if concurrent > 1 else "rounds over all shapes, shuffled each round")},
        busy_meas=busy, neighbours=concurrent - 1)
    if samples is not None:
        import numpy as np

        from sim.contention import condition_key, fit_conditions

        prof.contention = fit_conditions(points, samples)
        # every shape's median beside each kind of neighbour: the co-located drift check's references
        for row, *meds in zip(prof.grid, *(samples[c] for c in conds if c not in ("idle", "grid"))):
            row.update({condition_key(c): float(np.median(m))
                        for c, m in zip([c for c in conds if c not in ("idle", "grid")], meds)})
    if wake_steps is not None:  # (before the loop overhead goes in: the step logs' durations exclude it)
        cc = prof.contention_cost()

        def fit_pred(steps):  # the grid's fit for each logged step, no serving-loop term yet
            return step_predictions(cc, steps) if cc is not None else prof.cost.predict(steps_features(steps)[0])

        mix_steps = mix_replay(model_config, concurrent, num_blocks, cc or prof.cost, block_size, str(dev), seed)
        wk = wake_from_steps(wake_steps, fit_pred(wake_steps))
        wkb = wake_from_steps(wake_busy_steps, fit_pred(wake_busy_steps)) if wake_busy_steps is not None else None
        pf = prefill_factor_from_steps(mix_steps, fit_pred(mix_steps))
        prof.measure["wake"], prof.measure["prefill_loop"] = wk, pf
        if wkb is not None:
            prof.measure["wake_busy"] = wkb
        for attr in ("cost", "busy"):
            m = getattr(prof, attr)
            if m is None:
                continue
            if wk["factor"] is not None:
                m = m.with_wake((wk["after_s"], wk["factor"],
                                 *([wkb["factor"]] if wkb is not None and wkb["factor"] is not None else [])))
            if pf["factor"] is not None:
                m = m.with_prefill_factor(pf["factor"])
            setattr(prof, attr, m)
    if loop is not None:
        prof.measure["loop_overhead"] = loop
        prof.cost = prof.cost.with_overhead(loop["mean_s"])
        if prof.busy is not None:
            prof.busy = prof.busy.with_overhead(loop["mean_s"])
    return prof, fit


def model_record(spec) -> dict[str, Any]:
    """What a profile records of its model (executor.replay.ModelSpec): the config, its parameter count
    and, for weights loaded from a local directory, that directory (so the drift check can load them again)."""
    cfg = spec.cfg
    rec = {**dataclasses.asdict(cfg), "params": cfg.num_params}
    if spec.path is not None:
        rec["path"] = str(Path(spec.path).resolve())
    return rec


def profile_model_ref(prof) -> str | None:
    """The model a profile was measured on, as --model takes it: its weights' directory, else its preset name."""
    return prof.model.get("path") or prof.model.get("name")


def replicas_share_device(replicas: int, device: str) -> bool:
    """Whether some of `replicas` replicas run on the same device (the CPU, or fewer GPUs than replicas),
    as executor.replay.run_workload places them: then they slow each other down."""
    from executor.device import assign_devices, select_devices

    devs = assign_devices(replicas, select_devices(device))
    return len(set(map(str, devs))) < len(devs)


def same_model(prof, model_config: str) -> bool:
    """Whether `model_config` (a preset name or a directory) is the model the profile was measured on."""
    ref = profile_model_ref(prof)
    if ref is None:
        return False
    if prof.model.get("path"):
        return Path(model_config).is_dir() and Path(model_config).resolve() == Path(ref).resolve()
    return model_config == ref


def drift_probe_runner(prof, device: str | None = None):
    """The executor's model runner the drift check times (sim.calibrate.measure_drift), built as
    `run_profile` built the one it measured the grid on: the profile's model (preset with weights from its
    seed, or its weights' directory), its torch thread count, on `device` (default: the profile's); KV
    blocks for the reference shapes only (they reuse the same block ids, as the grid's shapes did)."""
    from executor.device import select_device
    from executor.replay import resolve_model
    from executor.runner import ModelRunner
    from sim.calibrate import drift_reference_shapes, grid_blocks_needed

    ref = profile_model_ref(prof)
    if not ref:
        raise ValueError("drift check: the profile names no model (model.name), so there is no model to re-time "
                         "its grid on")
    seed = int(prof.fit.get("seed", 0) or 0)
    spec = resolve_model(ref, seed)
    dev = select_device(device or prof.device.get("device") or "cpu")
    threads = prof.measure.get("threads")
    if threads is None and dev.type == "cpu":
        raise ValueError("drift check: the profile does not record its torch thread count (measure.threads)")
    threads = int(threads) if threads is not None else None
    block_size = int(prof.kv.get("block_size") or 16)
    need = grid_blocks_needed([p for *_, p in drift_reference_shapes(prof)], block_size)
    model = spec.build(str(dev))
    return ModelRunner(model, max(need, 1), block_size, device=dev, num_threads=threads)


# The neighbour condition the co-located drift check runs: decode batches (3 to 32 sequences, the
# profile's "decode" class), the step a loaded replica's neighbour runs most of the time, and a steady
# load (steps of 15-60 ms). Random grid shapes (a prefill of 2048 tokens takes about 1 s) made the
# check's factor swing from 0.88 to 1.13 around one replay.
BUSY_CHECK_CONDITION = "decode"
# Checks thrown away first, beside the just-started neighbour: with both vCPUs newly busy, this VM ran
# the shapes 1.7 x slower for about 5 s before settling (sim.calibrate.settled_drift's warmup_s).
BUSY_WARMUP_S = 6.0


def busy_check_reference(prof) -> tuple[str, str]:
    """(neighbour condition, grid column) the co-located drift check uses on this profile: the steady
    BUSY_CHECK_CONDITION when the profile stored every shape's median beside it, else the random grid
    shapes ("grid", busy_median_s) of profiles written before per-condition medians were kept.
    Raises ValueError when the profile has neither."""
    from sim.calibrate import drift_reference_shapes
    from sim.contention import condition_key

    if not prof.neighbours:
        raise ValueError("the profile has no busy-neighbour measurement (`twinfer profile --concurrent N`)")
    refs = drift_reference_shapes(prof)
    for cond, key in ((BUSY_CHECK_CONDITION, condition_key(BUSY_CHECK_CONDITION)), ("grid", "busy_median_s")):
        if all(isinstance(prof.grid[i].get(key), (int, float)) for _, i, _ in refs):
            return cond, key
    missing = ", ".join(p.label() for _, i, p in refs if "busy_median_s" not in prof.grid[i])
    raise ValueError(f"the profile's reference shapes have no busy medians ({missing})")


def colocated_drift(prof, probe, device: str | None = None) -> dict[str, Any]:
    """The co-located drift check: `probe` (drift_probe_runner) re-times the reference shapes while the
    profile's number of neighbour processes run the shapes of one neighbour condition (`busy_check_reference`),
    as the profile's interleaved measurement had them, against the profile's medians for that condition
    (sim.calibrate.settled_drift with `stored` that column). Start and stop of the neighbours are outside
    the timed part."""
    from executor.device import select_device
    from executor.replay import resolve_model
    from sim.calibrate import BusyNeighbours, grid_blocks_needed, grid_row_points, settled_drift
    from sim.contention import neighbour_groups

    cond, key = busy_check_reference(prof)  # raises for a profile without a busy-neighbour measurement
    n = int(prof.neighbours)
    points = [p for _, p in sorted(grid_row_points(prof).items())]
    group = neighbour_groups(points)[cond]
    if not group:
        raise ValueError(f"co-located drift check: the profile's grid has no {cond!r} shapes to run beside")
    block_size = int(prof.kv.get("block_size") or 16)
    dev = select_device(device or prof.device.get("device") or "cpu")
    t0 = time.perf_counter()
    seed = int(prof.fit.get("seed", 0) or 0)
    with BusyNeighbours(n, resolve_model(profile_model_ref(prof), seed), points, block_size,
                        grid_blocks_needed(points, block_size), int(prof.measure.get("threads") or 1), str(dev), seed,
                        groups=[group]) as nb:
        nb.switch(0)
        d = settled_drift(probe, prof, tries=4, warmup_s=BUSY_WARMUP_S, stored=key)
    d["neighbours"] = n
    d["condition"] = cond
    d["wall_s"] = time.perf_counter() - t0
    return d


def _busy_medians_missing(prof) -> str | None:
    """Why the co-located drift check cannot run on this profile, or None."""
    try:
        busy_check_reference(prof)
    except ValueError as e:
        return str(e)
    return None


def profile_from_steps(path: str, model_config: str, num_blocks: int, block_size: int, holdout: float, form: str,
                       seed: int, knee: Any = "auto"):
    """A profile fitted on the steps an engine actually ran (a random share of steps held back)."""
    from executor.replay import read_steps, resolve_model
    from sim.calibrate import Profile, fit_cost, gap_stats, library_versions, loop_gaps, steps_features, utc_now

    spec = resolve_model(model_config, seed)
    cfg = spec.cfg
    steps = read_steps(path)
    X, y, kinds = steps_features(steps)
    keep = y > 0
    X, y, kinds = X[keep], y[keep], [k for k, ok in zip(kinds, keep) if ok]
    if len(y) < 10:
        raise ValueError(f"{path}: {len(y)} steps; too few to fit a cost model")
    name = f"{cfg.name}@steps"
    fit = fit_cost(X, y, num_blocks * block_size, kinds=kinds, holdout=holdout, form=form, seed=seed, name=name,
                   padded_knee=knee)
    loop = gap_stats(loop_gaps(steps))
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    fit_d = fit.record(holdout, seed, median_iqr_rel=math.nan, max_iqr_rel=math.nan)
    return Profile(cost=fit.model.with_overhead(loop["mean_s"]), device={"source": "engine step log"},
                   model=model_record(spec), versions=library_versions(),
                   kv={"num_blocks": num_blocks, "block_size": block_size}, fit=fit_d,
                   measure={"source": str(path), "steps": int(len(y)), "kinds": counts, "timed": "Engine.step",
                            "loop_overhead": loop},
                   grid=[], created=utc_now(), name=name)


def _loadavg() -> float | None:
    try:
        import os

        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def cmd_profile(args: argparse.Namespace) -> int:
    from sim.calibrate import save_profile_file
    from sim.cli import _console

    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    holdout = 0.25 if args.holdout is None else args.holdout
    seed = 0 if args.seed is None else args.seed
    if args.refit and args.from_steps:
        raise ValueError("--refit and --from-steps: give one")
    if args.refit:
        from sim.calibrate import read_profile_file, refit_profile

        prof = refit_profile(read_profile_file(args.refit), form=args.form, padded_knee=args.knee,
                             holdout=args.holdout, seed=args.seed, where=args.refit)
    elif args.from_steps:
        prof = profile_from_steps(args.from_steps, args.model_config, args.num_blocks, args.block_size,
                                  holdout, args.form, seed, knee=args.knee)
    else:
        prof, _ = run_profile(args.model_config, args.device, repeats, args.warmup, args.quick, holdout,
                              args.form, args.threads, args.num_blocks, args.block_size, args.max_tokens, seed,
                              progress=show and not args.json, concurrent=args.concurrent,
                              loop_overhead=args.loop_overhead, knee=args.knee)
    path = save_profile_file(prof, args.out)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2, default=str))
        return 0
    _console().print(render_profile(prof))
    _console().print(f"wrote {path}")
    return 0


def render_profile(prof) -> Any:
    import numpy as np
    from rich.console import Group
    from rich.table import Table

    m = prof.measure
    what = (f"{m.get('points')} shapes, median of {m.get('repeats')}, {m.get('threads')} thread(s)" if prof.grid else
            f"{m.get('steps')} engine steps from {m.get('source')}")
    t = Table(title=f"twinfer profile: {prof.name} ({what})", title_justify="left")
    for c in ("shape", "measured (ms)", "spread (IQR)", "fitted (ms)", "error", "held out"):
        t.add_column(c, justify="left" if c == "shape" else "right")
    for g in prof.grid:
        err = (g["predicted_s"] - g["median_s"]) / g["median_s"]
        t.add_row(g["label"], f"{g['median_s'] * 1e3:,.2f}", f"{g['iqr_rel']:.1%}", f"{g['predicted_s'] * 1e3:,.2f}",
                  f"{err:+.1%}", "yes" if g["heldout"] else "")
    s = Table(show_header=False, box=None)
    s.add_column(style="bold")
    s.add_column()
    f = prof.fit
    h, tr = f["heldout"], f["train"]
    s.add_row("form", f"{f['form']} ({f['why']})")
    if f.get("knee", {}).get("why"):
        s.add_row("padded-token knee", f["knee"]["why"])
    s.add_row("held-out error", f"median {h['median_rel_error']:.1%}, max {h['max_rel_error']:.1%} over {h['n']} shapes")
    s.add_row("training error", f"median {tr['median_rel_error']:.1%}, max {tr['max_rel_error']:.1%} over {tr['n']} shapes")
    if prof.grid:
        s.add_row("measurement spread", f"median IQR {f['median_iqr_rel']:.1%} of the median, "
                                        f"worst {f['max_iqr_rel']:.1%}")
    for line, co in prof.cost.coefficients().items():
        if isinstance(co, dict):
            s.add_row(f"coefficients ({line})", ", ".join(f"{k} {v:.3g}" for k, v in co.items()))
    if prof.cost.step_overhead_s:
        lo = prof.measure.get("loop_overhead", {})
        s.add_row("engine loop overhead", f"{prof.cost.step_overhead_s * 1e3:.2f} ms per step (mean gap between "
                                          f"back-to-back steps over {lo.get('gaps', '?')} gaps of a real replay)")
    wk = prof.measure.get("wake")
    if wk:
        s.add_row("waking from idle",
                  (f"first step after {wk['after_s']:.1f} s idle or more: x{wk['factor']:.3f} its forward time "
                   if wk.get("factor") is not None else "not applied (fewer than 5 pairs); measured ")
                  + (f"(p25..p75 {wk['p25']:.3f}..{wk['p75']:.3f} over {wk['pairs']} bursts, against "
                     + (f"the burst's steps from step {wk['settle'] + 1} on" if wk.get("settle") else
                        "the step right after it")
                     + ", of a spaced real replay)" if wk.get("pairs") else "(no pairs)"))
    wkb = prof.measure.get("wake_busy")
    if wkb:
        applied = wkb.get("factor") is not None and (wk or {}).get("factor") is not None
        s.add_row("waking beside a busy neighbour",
                  (f"x{wkb['factor']:.3f} its forward time " if applied
                   else "not applied (fewer than 5 bursts, or no wake factor); measured ")
                  + (f"(p25..p75 {wkb['p25']:.3f}..{wkb['p75']:.3f} over {wkb['pairs']} bursts of a replica woken "
                     "while its neighbours decode throughout)" if wkb.get("pairs") else "(no bursts)"))
    pf = prof.measure.get("prefill_loop")
    if pf:
        parts = pf.get("parts") or []
        s.add_row("serving-loop prefill steps",
                  (f"x{pf['factor']:.3f} their forward time " if pf.get("factor") is not None
                   else "not applied (too few steps); measured ")
                  + f"(real/fit of {pf['prefill_steps']} steps with prefill tokens over the same of "
                    f"{pf['decode_steps']} decode steps, a calibration mix replayed for real"
                  + (f"; by quarter {min(parts):.3f}..{max(parts):.3f})" if parts else ")"))
    if prof.busy is not None:
        b = prof.busy_fit
        ratio = [g["busy_median_s"] / g["median_s"] for g in prof.grid if "busy_median_s" in g]
        s.add_row(f"{prof.neighbours} neighbour(s) busy",
                  f"steps {np.median(ratio):.2f} x as long (median over shapes); {b['form']} fit, held-out error "
                  f"median {b['heldout']['median_rel_error']:.1%}, max {b['heldout']['max_rel_error']:.1%}")
        for line, co in prof.busy.coefficients().items():
            if isinstance(co, dict):
                s.add_row(f"  coefficients ({line})", ", ".join(f"{k} {v:.3g}" for k, v in co.items()))
    for c, d in prof.contention.get("conditions", {}).items():
        if c == "idle":
            continue
        r, q = d.get("factor", {}), d.get("quartiles", {})
        s.add_row(f"beside a neighbour's {c.replace('_', ' ')} steps",
                  "steps x " + ", ".join(f"{v:.2f} ({k}; p25..p75 {q[k]['p25']:.2f}..{q[k]['p75']:.2f})" if k in q
                                         else f"{v:.2f} ({k})" for k, v in r.items()) + " of alone")
    s.add_row("KV capacity", f"{prof.cost.kv_capacity_tokens:,} tokens")
    if "seconds" in m:
        load = m.get("loadavg_1m")
        s.add_row("took", f"{m['seconds']:.1f} s" + (f" (1-min load average {load:.2f})" if load is not None else ""))
    return Group(t, s)


# ---- validate --------------------------------------------------------------------------------

def fit_to_model(w, max_position: int):
    """Requests the executor's model can hold (input + output - 1 <= max_position), and how many were left out.
    The simulator does not know a model's position limit, so both sides get the same filtered workload."""
    import numpy as np

    keep = np.flatnonzero(w.input_tokens + w.output_tokens - 1 <= max_position)
    if len(keep) == len(w):
        return w, 0
    return w.take(keep), len(w) - len(keep)


def default_drift_check(device: str) -> bool:
    """Whether the drift check runs when not asked either way: on the CPU, not on CUDA. A shared CPU's
    speed wanders between runs and the check follows it. On an H100 (6 fidelity cells) the check's
    reference shapes, launch-bound steps timed for about 2 s in the parent process, read 0.64-1.31 x the
    profile while the cells' own steps ran 0.95-1.05 x it, so correcting by it made the prediction worse."""
    return not str(device).startswith("cuda")


LOOP_MIXES = ("workload", "cell", "calibration")  # the loop drift check's request mix (run_validate's loop_mix)
LOOP_ARRIVALS = ("gaps", "poisson")  # how the "cell" mix's requests arrive (run_validate's loop_arrivals)
CELL_CHECK_SPAN_S = 60.0  # the "cell" mix's arrivals span at most about this long (`cell_check_requests`)
CELL_CHECK_MIN_REQUESTS = 8


def cell_check_requests(rate: float) -> int:
    """How many requests a "cell" mix loop drift check replays at the workload's mean `rate` (requests/s):
    sim.calibrate.LOOP_CHECK_REQUESTS, or fewer where those would arrive over more than CELL_CHECK_SPAN_S
    (never below CELL_CHECK_MIN_REQUESTS), so a check of a sparse workload stays about a minute long."""
    from sim.calibrate import LOOP_CHECK_REQUESTS

    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"cell loop check: rate={rate!r} is out of range; allowed: a finite rate > 0 requests/s")
    return int(max(CELL_CHECK_MIN_REQUESTS, min(LOOP_CHECK_REQUESTS, math.floor(rate * CELL_CHECK_SPAN_S) + 1)))


def run_validate(w, cfg, profile_path: str, model_config: str | None, device: str | None, repeat: int,
                 time_limit: float, keep_steps: str | Path | None = None, drift_check: bool | None = None,
                 busy_drift_check: bool = False, loop_drift_check: bool | None = None,
                 loop_before: dict[str, Any] | None = None, loop_mix: str = "cell",
                 loop_also: str | None = None, keep_records: str | Path | None = None,
                 loop_arrivals: str = "gaps") -> dict[str, Any]:
    """Simulate once, replay `repeat` times; returns the comparison and both sides' summaries.
    keep_steps: a path prefix; each real run's engine step log is copied to PREFIX.K.csv (K = run).
    keep_records: a path prefix; the headline prediction's per-request records go to PREFIX.sim.csv, the
    prediction at the real runs' own step pace ("step_time_corrected") to PREFIX.paced.csv and each real run's
    to PREFIX.real.K.csv (traces.records schema, matched by id), for a request-by-request look.

    drift_check (None: `default_drift_check` of the device): time the profile's reference shapes
    (sim.calibrate.measure_drift) in this process right
    before the first real run and right after the last, with no replica running, and simulate again with
    the step times scaled by the geometric mean of the two factors (sim.calibrate.drift_corrected).
    "comparison" and "sim" are then the corrected prediction's; "comparison_uncorrected" and
    "sim_uncorrected" the profile's as measured (the same objects when the check is off).

    busy_drift_check (with drift_check, co-located replicas and a profile measured with --concurrent N):
    also re-time the reference shapes beside the profile's busy neighbours (`colocated_drift`), before and
    after, and correct the contention factors by busy / alone (sim.calibrate.drift_corrected's
    busy_factor). "comparison" is then that prediction's, "comparison_alone_drift" the alone check's.

    loop_drift_check (None: on where the drift check is on by default, `default_drift_check`): before and after
    the real run(s) (outside the reference-shape checks), replay a short calibration mix on the same replicas
    (sim.calibrate.loop_pace: the pace of the replicas' own steps against the cost model, their processes,
    shared cores and serving loop included) and simulate again with the forward time scaled by the geometric
    mean of the two: "comparison_loop_drift", "loop_drift". That prediction is then the headline
    ("comparison", "sim", "paired"; "headline": "loop"), and the reference-shape check's (or, with that check
    off, the uncorrected one) is kept as "comparison_reference_drift". The check read by kind is kept beside
    them (sim.calibrate.kind_corrected: decode-only steps scaled by the geometric mean of the two checks'
    decode ratios, steps with prefill tokens by that of their with-prefill ratios; "comparison_loop_kind",
    "loop_drift" "decode_factor" and "with_prefill_factor"; None where a check has no ratio of one kind): over
    nine full fidelity runs on this project's CPU it did no better than the single factor (experiments/FIDELITY.md). The
    prediction with step jitter is kept beside them too ("comparison_loop_jitter", StepJitter.from_checks: the single
    factor, each simulated step's time times a draw from the spread of the two checks' own steps around the
    model, sim.jitter; the median of sim.calibrate.JITTER_RUNS such runs, each figure with its band over them,
    sim.calibrate.with_prediction_band; "loop_drift" "jitter": the spread's p10/p50/p90 per kind).
    loop_before: a check already taken right before this call (a previous run's "after", with the same
    loop_mix), used instead of a new one. loop_mix (LOOP_MIXES): "workload", 24 requests whose
    (prompt, output) pairs are drawn from the workload's own (traces.synth.fit_lengths, a fixed seed: the
    same requests every check), so the check runs the workload's mix of step shapes and reads the pace of
    those (no arrival time, outcome or measurement of the workload's is used); "calibration", 24 requests of
    log-uniform lengths, nothing from the workload (the default up to fidelity run T: its step shapes are not
    the workload's, and the model's error differed between the two mixes by 2-6 % per trace); "cell" (the
    default from fidelity run V on), the workload mix's lengths replayed under `cfg` (scheduler, router,
    replicas) with arrivals as loop_arrivals says (LOOP_ARRIVALS): "gaps" (the default from fidelity run Z3
    on), gaps drawn from the workload's own inter-arrival gaps (a fixed seed, each cut to
    sim.calibrate.CHECK_MAX_GAP_S), "poisson", Poisson at its mean rate; so the check also has the workload's
    batch sizes, bursts and co-location (`cell_check_requests`: fewer requests at a low rate; a check of one
    configuration does not serve another's: loop_before must come from the same cfg and arrivals).
    loop_also (a mix of LOOP_MIXES, with the loop check on): a second check of that mix, before the first one
    and after it, its prediction kept as "comparison_loop_also" and loop_drift["also"]: two mixes compared on
    the same real runs."""
    import numpy as np

    from executor.replay import read_steps, resolve_model, run_workload
    from sim.calibrate import (
        compare, drift_corrected, drift_reference_shapes, jittered_prediction, kind_corrected, loop_kind_factors,
        loop_pace, neighbour_share, paired_errors, read_profile_file, sampling_bands, settled_drift, step_check,
        with_prediction_band,
    )
    from sim.cluster import simulate
    from sim.config import flatten
    from sim.jitter import StepJitter
    from traces.report import summarize

    if repeat < 1:
        raise ValueError(f"--repeat={repeat} is out of range; allowed: >= 1")
    if loop_mix not in LOOP_MIXES:
        raise ValueError(f"--loop-mix={loop_mix!r} is not one of: {', '.join(LOOP_MIXES)}")
    if loop_also is not None and loop_also not in LOOP_MIXES:
        raise ValueError(f"--loop-also={loop_also!r} is not one of: {', '.join(LOOP_MIXES)}")
    if loop_arrivals not in LOOP_ARRIVALS:
        raise ValueError(f"--loop-arrivals={loop_arrivals!r} is not one of: {', '.join(LOOP_ARRIVALS)}")
    prof = read_profile_file(profile_path)
    cost = prof.cost
    mname = model_config or profile_model_ref(prof)
    if not mname:
        raise ValueError(f"{profile_path}: the profile names no model; give --model-config")
    mcfg = resolve_model(mname).cfg
    device = device or prof.device.get("device") or "cpu"
    drift_default_off = drift_check is None and not default_drift_check(device)
    if drift_check is None:
        drift_check = default_drift_check(device)
    if loop_drift_check is None:
        loop_drift_check = default_drift_check(device)
    if loop_also and not loop_drift_check:
        raise ValueError(f"--loop-also={loop_also} compares a second loop drift check with the first: it needs the "
                         f"loop drift check on (--loop-drift-check)")
    prof_threads = int(prof.measure.get("threads") or 1)
    block_size = cfg.scheduler.block_size
    num_blocks = cfg.num_blocks or cost.kv_capacity_tokens // block_size
    cfg = dataclasses.replace(cfg, num_blocks=num_blocks)
    w, dropped = fit_to_model(w, mcfg.max_position)
    if not len(w):
        raise ValueError(f"no request of the workload fits the model's max_position={mcfg.max_position}")
    if drift_check:
        drift_reference_shapes(prof)  # no grid to re-time: fail before anything runs
        if not same_model(prof, mname):
            raise ValueError(f"drift check: the profile's grid was measured on model {profile_model_ref(prof)!r}, "
                             f"the executor runs {mname!r}; their step times do not compare (--no-drift-check)")
    # Co-located replicas: the step-by-step model when the profile measured what each kind of neighbour step
    # does (sim.contention); else the busy-neighbour fit blended by the neighbours' average busy share.
    shared = replicas_share_device(cfg.replicas, device)
    ccost = prof.contention_cost() if shared else None
    if ccost is not None:
        u, cost = None, ccost
        forward = ccost.with_overhead(0.0)
    else:
        u, cost = neighbour_share(w, cfg, prof)
        forward = cost.with_overhead(0.0)  # what an engine step log's durations measure (the loop's gap excluded)
    sim_res = head_res = simulate(w, cfg, cost=cost)  # head_res: the headline prediction's run
    sim_sum = summarize(sim_res, cfg.slo)
    busy_skip = None
    if drift_check and busy_drift_check:
        busy_skip = ("one replica" if cfg.replicas < 2 else
                     "the replicas do not share a device" if not shared else
                     "the profile has no co-location measurement (`twinfer profile --concurrent N`)"
                     if ccost is None else _busy_medians_missing(prof))
    colocated = drift_check and busy_drift_check and busy_skip is None

    def check_loop(mix: str = loop_mix) -> dict[str, Any]:
        from traces.synth import fit_lengths

        own: dict[str, Any] = {}
        if mix == "cell" and len(w) > 1 and w.span > 0:  # (one request, or all at once: no rate to keep)
            rate = (len(w) - 1) / w.span
            own = {"cfg": cfg, "requests": cell_check_requests(rate),
                   **({"gaps": np.diff(np.sort(w.arrival))} if loop_arrivals == "gaps" else {"rate": rate})}
        return loop_pace(mname, cfg.replicas, num_blocks, forward, block_size, device, contention=ccost is not None,
                         **({"lengths": fit_lengths(w)} if mix in ("workload", "cell") else {}), **own)

    also_b = check_loop(loop_also) if loop_drift_check and loop_also else None
    loop_b = (loop_before or check_loop()) if loop_drift_check else None
    probe = drift_before = busy_before = None
    if drift_check:
        # the executor's model, alone in this process, right before the replicas start
        probe = drift_probe_runner(prof, device)
        drift_before = settled_drift(probe, prof)
        if colocated:
            busy_before = colocated_drift(prof, probe, device)
    reals, wall, steps, logs, run_bands, real_records = [], [], [], [], [], []
    max_duration = float(w.arrival[-1] - w.arrival[0]) + time_limit
    for k in range(repeat):
        with tempfile.TemporaryDirectory(prefix="twinfer-validate-") as tmp:
            t0 = time.perf_counter()
            res = run_workload(w, cfg, model_config=mname, device=device, max_duration=max_duration, out=tmp)
            wall.append(time.perf_counter() - t0)
            logs.append(read_steps(Path(tmp) / "steps.csv"))
            steps.append(step_check(forward, logs[-1], contention=forward if ccost is not None else None))
            if keep_steps is not None:
                import shutil

                dst = Path(f"{keep_steps}.{k}.csv")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / "steps.csv", dst)
        real_threads = res.meta.get("threads_per_replica")
        real_host = (res.meta.get("device_info") or {}).get("host_memory", "")
        reals.append(summarize(res, cfg.slo))
        real_records.append(res.records)
        run_bands.append(sampling_bands(res.records))
        if keep_records is not None:
            Path(keep_records).parent.mkdir(parents=True, exist_ok=True)
            res.write_csv(f"{keep_records}.real.{k}.csv")
    # each real figure's resampling band (the median band over the runs)
    bands = {k: (float(np.median([b[k][0] for b in run_bands])), float(np.median([b[k][1] for b in run_bands])))
             for k in set.intersection(*(set(b) for b in run_bands))}
    cmp = cmp_raw = cmp_alone = compare(sim_sum, reals, bands)
    sim_raw = sim_sum
    drift: dict[str, Any] = {"enabled": False}
    if probe is not None:
        drift_after = settled_drift(probe, prof)  # the replicas have exited
        busy_after = colocated_drift(prof, probe, device) if colocated else None
        del probe
        level = math.sqrt(drift_before["factor"] * drift_after["factor"])
        head_res = simulate(w, cfg, cost=drift_corrected(cost, level))
        sim_sum = summarize(head_res, cfg.slo)
        cmp = cmp_alone = compare(sim_sum, reals, bands)
        drift = {"enabled": True, "factor": level, "before": drift_before, "after": drift_after,
                 "steps_real_over_corrected": [sc["busy_ratio"] / level for sc in steps if sc.get("steps")],
                 "colocated": {"enabled": False, **({"skipped": busy_skip} if busy_skip else {})}}
        if colocated:
            blevel = math.sqrt(busy_before["factor"] * busy_after["factor"])
            head_res = simulate(w, cfg, cost=drift_corrected(cost, level, blevel))
            sim_sum = summarize(head_res, cfg.slo)
            cmp = compare(sim_sum, reals, bands)
            fwd = drift_corrected(forward, level, blevel)
            drift["colocated"] = {
                "enabled": True, "factor": blevel, "contention_scale": blevel / level, "before": busy_before,
                "after": busy_after,
                "steps_real_over_corrected": [step_check(fwd, lg, contention=fwd).get("busy_ratio") for lg in logs]}
    loop: dict[str, Any] = {"enabled": False}
    cmp_loop = cmp_kind = cmp_also = cmp_jit = None
    cmp_ref = cmp  # the reference-shape check's prediction (the uncorrected one with that check off)
    headline = "reference" if drift["enabled"] else "uncorrected"
    if loop_b is not None:
        loop_a = check_loop()
        lf = math.sqrt(loop_b["factor"] * loop_a["factor"])
        loop_res = simulate(w, cfg, cost=drift_corrected(cost, lf))
        loop_sum = summarize(loop_res, cfg.slo)
        cmp = cmp_loop = compare(loop_sum, reals, bands)
        head_res, sim_sum, headline = loop_res, loop_sum, "loop"
        jit = StepJitter.from_checks(loop_b, loop_a)
        if jit is not None:  # the same pace, each step's time drawn around it as the checks' steps spread
            jit_sum, jit_bands, _ = jittered_prediction(w, cfg, drift_corrected(cost, lf), jit)
            cmp_jit = with_prediction_band(compare(jit_sum, reals, bands), jit_bands)
        kf = loop_kind_factors(loop_b, loop_a)
        if kf is not None:  # decode and prefill steps each at their own pace: beside the headline
            cmp_kind = compare(summarize(simulate(w, cfg, cost=kind_corrected(cost, *kf)), cfg.slo), reals, bands)
        also = None
        if also_b is not None:
            also_a = check_loop(loop_also)
            af = math.sqrt(also_b["factor"] * also_a["factor"])
            cmp_also = compare(summarize(simulate(w, cfg, cost=drift_corrected(cost, af)), cfg.slo), reals, bands)
            also = {"mix": loop_also, "factor": af, "before": also_b, "after": also_a}
        loop = {"enabled": True, "factor": lf, "before": loop_b, "after": loop_a, "mix": loop_mix, "also": also,
                "jitter": jit.summary() if jit is not None else None,
                "decode_factor": kf[0] if kf else None, "with_prefill_factor": kf[1] if kf else None,
                "before_shared": loop_before is not None,
                "steps_real_over_corrected": [sc["busy_ratio"] / lf for sc in steps if sc.get("steps")]}
    # Attribution: the simulator again, told how fast the machine actually ran its steps. If this agrees
    # with the executor, the schedule is right and the error is the step-time level (model or machine load).
    factor = float(np.median([sc["busy_ratio"] for sc in steps if sc.get("steps")] or [1.0]))
    paced_res = simulate(w, cfg, cost=drift_corrected(cost, factor))  # forward time scaled, the loop's gap kept
    corr = compare(summarize(paced_res, cfg.slo), reals, bands)
    corrected = {"factor": factor, "median_abs_rel_error": corr["median_abs_rel_error"],
                 "rel_errors": {k: v["rel_error"] for k, v in corr["metrics"].items()},
                 "paired": [paired_errors(paced_res.records, rr) for rr in real_records]}
    if keep_records is not None:
        head_res.write_csv(f"{keep_records}.sim.csv")
        paced_res.write_csv(f"{keep_records}.paced.csv")
    notes = []
    if drift_default_off:
        notes.append(f"drift check off on {device} by default (on a GPU its short reference timings misread the "
                     f"serving loop's pace); --drift-check turns it on")
    if prof.busy is None and shared:
        notes.append(f"{cfg.replicas} replicas share a device but the profile measured one alone: profile with "
                     f"--concurrent {cfg.replicas} to model how they slow each other down")
    elif prof.busy is not None and prof.neighbours != cfg.replicas - 1:
        notes.append(f"the profile's busy measurement had {prof.neighbours} neighbour(s); this run has "
                     f"{cfg.replicas - 1}")
    if drift["enabled"]:
        for when in ("before", "after"):
            if not drift[when].get("settled", True):
                notes.append(f"the drift check {when} the real run(s) did not settle (factors "
                             + ", ".join(f"{x:.2f}" for x in drift[when]["attempts"])
                             + "): other load on the machine? its median was used")
        fb, fa = drift["before"]["factor"], drift["after"]["factor"]
        if max(fa, fb) / min(fa, fb) > 1.1:
            notes.append(f"the drift check's reference shapes ran {fb:.2f} x their profiled time before the real "
                         f"run(s) and {fa:.2f} x after: the machine's speed changed during the run (other load?), so "
                         f"the correction by their geometric mean {drift['factor']:.2f} is uncertain")
    if real_threads != prof_threads and str(device).startswith("cpu"):
        notes.append(f"the profile was measured with {prof_threads} torch thread(s) per replica; the executor ran "
                     f"{real_threads} (cores // replicas): step times differ for that reason alone")
    prof_host = str(prof.device.get("host_memory") or "system: not recorded (profiled before twinfer set it)")
    if real_host and prof_host.split(":")[0] != real_host.split(":")[0]:
        notes.append(f"the profile was measured with host memory '{prof_host}', the executor ran with '{real_host}': "
                     f"long prefills differ by about 10 % for that reason alone (executor.hostmem); profile again")
    if drift["enabled"] and drift["colocated"]["enabled"]:
        cb = drift["colocated"]
        fb, fa = cb["before"]["factor"], cb["after"]["factor"]
        if max(fa, fb) / min(fa, fb) > 1.1:
            notes.append(f"the co-located drift check ran {fb:.2f} x the profile's busy medians before the real "
                         f"run(s) and {fa:.2f} x after: the correction by their geometric mean {cb['factor']:.2f} "
                         f"is uncertain")
    elif drift["enabled"] and busy_drift_check and drift["colocated"].get("skipped") and ccost is not None:
        notes.append(f"co-located drift check skipped: {drift['colocated']['skipped']}")
    if loop["enabled"]:
        fb, fa = loop["before"]["factor"], loop["after"]["factor"]
        if max(fa, fb) / min(fa, fb) > 1.1:
            notes.append(f"the loop drift check ({loop['mix']} mix) ran {fb:.2f} x the cost model before the real "
                         f"run(s) and {fa:.2f} x after: the correction by their geometric mean {loop['factor']:.2f} "
                         f"is uncertain")
    return {"headline": headline, "comparison": cmp, "comparison_reference_drift": cmp_ref,
            "comparison_uncorrected": cmp_raw, "drift": drift,
            "comparison_alone_drift": cmp_alone, "loop_drift": loop, "comparison_loop_drift": cmp_loop,
            "comparison_loop_kind": cmp_kind, "comparison_loop_also": cmp_also, "comparison_loop_jitter": cmp_jit,
            "paired": [paired_errors(head_res.records, rr) for rr in real_records],
            # the executor against itself: each later real run's requests over the first run's
            "paired_real": [paired_errors(rr, real_records[0]) for rr in real_records[1:]],
            "step_check": steps, "step_time_corrected": corrected, "notes": notes,
            "neighbours_busy_share": u if prof.busy is not None else None,
            "cost_model": ("co-located, step by step (sim.contention)" if ccost is not None else
                           "busy-neighbour blend" if prof.busy is not None else "alone"),
            "sim": sim_sum, "sim_uncorrected": sim_raw, "real": reals,
            "config": flatten(cfg), "profile": str(profile_path), "model": mname, "device": device,
            "threads": real_threads, "workload": w.name, "requests": len(w),
            "dropped_too_long": dropped, "real_wall_s": wall, "loadavg_1m": _loadavg()}


def cmd_validate(args: argparse.Namespace) -> int:
    from sim.calibrate import render_comparison
    from sim.cli import _console, config_from_args, load_workload

    cfg = config_from_args(args)
    if not (cfg.profile.endswith((".toml", ".json")) or Path(cfg.profile).is_file()):
        raise ValueError("validate needs --profile FILE: a fitted profile written by `twinfer profile`")
    w = load_workload(args)
    out = run_validate(w, cfg, cfg.profile, args.model_config, args.device, args.repeat, args.time_limit,
                       drift_check=args.drift_check, busy_drift_check=args.busy_drift_check,
                       loop_drift_check=args.loop_drift_check, loop_mix=args.loop_mix, loop_also=args.loop_also,
                       keep_records=args.records, loop_arrivals=args.loop_arrivals)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
    if args.json:
        print(json.dumps(out, indent=2, default=_json_default))
        return 0
    c = out["comparison"]
    dr = out["drift"]
    lp = out["loop_drift"]
    title = (f"twinfer validate: {out['workload']}, {out['requests']:,} requests, {cfg.replicas} replica(s), "
             f"router {cfg.router}, {cfg.scheduler.kind} scheduler; sim {Path(out['profile']).name}"
             + (f" (loop-drift-corrected x{lp['factor']:.3f})" if out["headline"] == "loop" else
                f" (drift-corrected x{dr['factor']:.3f})" if dr["enabled"] else "")
             + f" vs executor {out['model']} on {out['device']} ({out['threads']} thread(s))")
    _console().print(render_comparison(c, title=title))
    worst = c["worst"]
    _console().print(f"median |error| over TTFT/TPOT/E2E/throughput: {c['median_abs_rel_error']:.1%}; worst: "
                     + (f"{worst['metric']} {worst['abs_rel_error']:.1%}" if worst else "-"))
    if dr["enabled"]:
        b, a = dr["before"], dr["after"]
        _console().print(f"drift check: the profile's {len(b['shapes'])} reference shapes ran {b['factor']:.3f} x "
                         f"their profiled time before the real run(s) and {a['factor']:.3f} x after (median over "
                         f"shapes); its correction: step times x{dr['factor']:.3f} (geometric mean)")
        _console().print(f"without the drift correction: {_p50_errors(out['comparison_uncorrected'])}")
        cb = dr["colocated"]
        if cb["enabled"]:
            _console().print(f"co-located drift check: beside {cb['before']['neighbours']} busy neighbour(s) the "
                             f"reference shapes ran {cb['before']['factor']:.3f} x the profile's busy medians before "
                             f"and {cb['after']['factor']:.3f} x after; contention factors scaled by "
                             f"{cb['contention_scale']:.3f} (busy {cb['factor']:.3f} / alone {dr['factor']:.3f})")
            _console().print(f"with the alone drift check only: {_p50_errors(out['comparison_alone_drift'])}")
    for k, pe in enumerate(out["paired"]):
        at_pace = out["step_time_corrected"]["paired"][k]
        _console().print(f"request by request (real run {k + 1}, {pe['requests']:,} requests completed on both sides), "
                         "median sim / real - 1 (p10..p90): " + _paired_spread(pe)
                         + "; at the run's own step pace: " + ", ".join(
                             f"{lab} {_fmt_rel(at_pace[m]['median'])}"
                             for m, lab in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"))))
    for k, pe in enumerate(out["paired_real"]):
        _console().print(f"run to run (real run {k + 2} over real run 1, request by request, {pe['requests']:,} "
                         "requests): median (p10..p90): " + _paired_spread(pe))
    if lp["enabled"]:
        _console().print(f"loop drift check (the headline, {lp['mix']} mix): its steps ran "
                         f"{lp['before']['factor']:.3f} x the cost model before the real run(s) and "
                         f"{lp['after']['factor']:.3f} x after"
                         f"; the simulator's forward time scaled by {lp['factor']:.3f} (geometric mean)")
        if out["comparison_loop_kind"] is not None:
            _console().print(f"read by kind instead (decode {lp['before']['decode']:.3f} / {lp['after']['decode']:.3f}"
                             f", with prefill {lp['before']['with_prefill']:.3f} / {lp['after']['with_prefill']:.3f}: "
                             f"decode steps x{lp['decode_factor']:.3f}, steps with prefill tokens "
                             f"x{lp['with_prefill_factor']:.3f}): {_p50_errors(out['comparison_loop_kind'])}")
        if out["comparison_loop_jitter"] is not None:
            from sim.calibrate import JITTER_RUNS
            from sim.jitter import StepJitter, describe

            cj = out["comparison_loop_jitter"]
            _console().print(f"with step jitter (each step's time drawn around that pace as the checks' steps spread: "
                             f"{describe(StepJitter.from_checks(lp['before'], lp['after']))}; median of {JITTER_RUNS} seeds): "
                             f"{_p50_errors(cj)}; the real figure inside the seeds' p10..p90 for "
                             f"{cj['in_prediction_band']} of {len(cj['metrics'])}")
        if lp.get("also"):
            al = lp["also"]
            _console().print(f"with a {al['mix']} mix check instead ({al['before']['factor']:.3f} before, "
                             f"{al['after']['factor']:.3f} after -> x{al['factor']:.3f}): "
                             f"{_p50_errors(out['comparison_loop_also'])}")
        if dr["enabled"]:
            _console().print(f"with the reference-shape check's correction instead (x{dr['factor']:.3f}): "
                             f"{_p50_errors(out['comparison_reference_drift'])}")
    for k, sc in enumerate(out["step_check"]):
        if sc.get("steps"):
            _console().print(f"real run {k + 1}: {sc['steps']:,} steps took {sc['busy_ratio']:.2f} x the profile's "
                             f"prediction for their shapes (median step {sc['median_ratio']:.2f} x, p10..p90 "
                             f"{sc['p10_ratio']:.2f}..{sc['p90_ratio']:.2f})"
                             + (f"; {sc['busy_ratio'] / lp['factor']:.2f} x the loop-drift-corrected one"
                                if out["headline"] == "loop" else
                                f"; {sc['busy_ratio'] / dr['factor']:.2f} x the drift-corrected one"
                                if dr["enabled"] else "")
                             + "; by kind: " + ", ".join(
                                 f"{lab} {sc[key]['busy_ratio']:.2f} x ({sc[key]['steps']:,})"
                                 for key, lab in (("decode_only", "decode"), ("prefill_only", "prefill"),
                                                  ("mixed", "mixed")) if sc.get(key, {}).get("steps")))
    if out["cost_model"].startswith("co-located"):
        _console().print("co-located replicas: each simulated step is slowed by what the other replicas have in "
                         "progress when it starts (the profile's contention measurement)")
    elif out["neighbours_busy_share"] is not None:
        _console().print(f"co-located replicas: the simulator's neighbours were busy {out['neighbours_busy_share']:.0%} "
                         f"of each replica's busy time; step costs blended accordingly")
    sc = out["step_time_corrected"]
    _console().print(f"attribution: with its steps {sc['factor']:.2f} x as long (the executor's measured pace), the "
                     f"simulator's median |error| would be {sc['median_abs_rel_error']:.1%}")
    for note in out["notes"]:
        _console().print(f"[yellow]note: {note}[/yellow]")
    if out["dropped_too_long"]:
        _console().print(f"[yellow]{out['dropped_too_long']} requests longer than the model's positions were left "
                         f"out of both runs[/yellow]")
    if args.out:
        _console().print(f"wrote {args.out}")
    return 0


def _p50_errors(cmp: dict[str, Any]) -> str:
    """A comparison's median |error| and its p50 errors, for one line."""
    return f"median |error| {cmp['median_abs_rel_error']:.1%}; " + ", ".join(
        f"{lab} {_fmt_rel(cmp['metrics'].get(m, {}).get('rel_error'))}"
        for m, lab in (("ttft.p50", "TTFT p50"), ("tpot.p50", "TPOT p50"), ("e2e.p50", "E2E p50")))


def _paired_spread(pe: dict[str, Any]) -> str:
    """`paired_errors`' median (p10..p90) per metric, for one line."""
    return ", ".join(f"{lab} {_fmt_rel(pe[m]['median'])} ({_fmt_rel(pe[m]['p10'])}..{_fmt_rel(pe[m]['p90'])})"
                     for m, lab in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E")))


def _fmt_rel(e: float | None) -> str:
    return "n/a" if e is None or not math.isfinite(e) else f"{e:+.1%}"


def _json_default(o: Any) -> Any:
    from traces.report import _json_default as d

    return d(o)
