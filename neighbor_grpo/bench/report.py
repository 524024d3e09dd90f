"""`ngrpo compare`'s curves turned into its frozen numbers (benchmark_rules), a markdown table and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

from neighbor_grpo.bench import rules as rules
from neighbor_grpo.bench.plots import plot_report, series as _series  # noqa: F401  (compare and render draw through it)

GOLD_PARTS = ("gold_class", "typical")  # digit_gold's components; a gold without components (ocr_tesseract) has none
MONITORS = (*GOLD_PARTS, "proxy", "out_of_range", "diversity", "realism")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def time_to_target(run: dict, target: float, s_per_iter: float | None = None, sustained: bool = False) -> dict:
    """Forward-equivalents, iterations, optimizer steps (runs that count them) and wall-clock seconds (iterations x
    `s_per_iter`: the interleaved throughput measurement's median, else the run's own) to the gold target; None
    when censored, with the run's budget in the same units as the bound. `sustained`: the headline is the sustained
    crossing (issue #23); the other crossing's forward-equivalents are kept beside it either way."""
    gold = _series(run, "gold")
    crossing = rules.sustained_crossing if sustained else rules.crossing_point
    s_per_iter = run["median_s_per_iter"] if s_per_iter is None else s_per_iter
    iterations = crossing(_series(run, "iteration"), gold, target)
    out = {"fe": crossing(_series(run, "fe"), gold, target), "iterations": iterations,
           "wall_s": None if iterations is None else iterations * s_per_iter,
           "budget_fe": run["curve"][-1]["fe"], "budget_iterations": run["iterations"],
           "budget_wall_s": run["iterations"] * s_per_iter, "crossing": "sustained" if sustained else "first",
           "first_fe": rules.crossing_point(_series(run, "fe"), gold, target),
           "sustained_fe": rules.sustained_crossing(_series(run, "fe"), gold, target)}
    if all("optimizer_steps" in r for r in run["curve"]):
        out["optimizer_steps"] = crossing(_series(run, "optimizer_steps"), gold, target)
        out["budget_optimizer_steps"] = run["optimizer_steps"]
    return out


def uses_sustained_crossing(results: dict) -> bool:
    """Tables from the issue #23 protocol on report the sustained crossing; older ones keep their first crossing."""
    return "sustained" in results["rules"].get("time_to_target", "")


def chosen_settings(results: dict, method: str) -> tuple[float, str | None]:
    """(lr, knob label) a row ran its seeds at (`selection`; results before the knob grid: `lr_selection`)."""
    if "selection" in results:
        chosen = results["selection"][method]
        return chosen["chosen_lr"], chosen["chosen_knob"]
    return results["lr_selection"][method]["chosen"], None


def ema_finals(runs: dict, seeds: list[str]) -> dict | None:
    """Final gold and proxy of the reference EMA's weights per seed (the mean of the EMA evaluations at the last
    points), or None when the row kept no EMA."""
    per_seed = {"gold": [], "proxy": []}
    for s in seeds:
        records = [r["ema"] for r in runs[s]["curve"] if "ema" in r]
        if not records:
            return None
        for key in per_seed:
            per_seed[key].append(_mean([r[key] for r in records]))
    return {k: {**rules.t_interval(v), "per_seed": v} for k, v in per_seed.items()}


def _geometric_mean_ratio(theirs: list[float], ours: list[float]) -> float:
    return math.exp(_mean([math.log(b / a) for a, b in zip(ours, theirs)]))


def cost_split(ours: list[dict], theirs: list[dict], ours_runs: list[dict], theirs_runs: list[dict],
               s_ratio: float | None) -> dict:
    """X / reference time to target, split: FE to target = iterations to target x FE per iteration (per-seed
    geometric mean), wall-clock to target = iterations to target x s/iter (the throughput measurement's)."""
    return {"time_ratio_iterations": rules.paired_ratio([r["iterations"] for r in ours],
                                                        [r["iterations"] for r in theirs],
                                                        [r["budget_iterations"] for r in ours],
                                                        [r["budget_iterations"] for r in theirs]),
            "fe_per_iter_ratio": _geometric_mean_ratio([r["fe_per_iter"] for r in theirs_runs],
                                                       [r["fe_per_iter"] for r in ours_runs]),
            "s_per_iter_ratio": s_ratio}


def summarize(results: dict, frozen_target: float | None) -> dict:
    """Finals, the target (frozen when given, and recomputed), time to target, paired ratios (split into progress
    and cost per iteration) and 'no worse' against the reference method, gold at a common distance from the base,
    and the reference EMA's final gold where a row kept one."""
    runs, seeds = results["runs"], [str(s) for s in results["settings"]["seeds"]]
    ref = results["rules"]["reference_method"]
    speed = results.get("throughput", {}).get("s_per_iter", {})
    base = runs[ref][seeds[0]]["curve"][0]
    finals = {m: {k: [rules.final_value(_series(runs[m][s], k)) for s in seeds] for k in ("gold", *MONITORS)
                  if all(runs[m][s]["curve"][-1].get(k) is not None for s in seeds)} for m in runs}
    recomputed = rules.frozen_target(base["gold"], {m: f["gold"] for m, f in finals.items()})
    target = recomputed if frozen_target is None else frozen_target
    sustained = uses_sustained_crossing(results)
    reached = {m: [time_to_target(runs[m][s], target, speed.get(m), sustained) for s in seeds] for m in runs}
    # distance from the base: the farthest every run got, and the gold each run had there
    common = min(max(_series(runs[m][s], "distance")) for m in runs for s in seeds)
    at_distance = {m: [rules.value_at(_series(runs[m][s], "distance"), _series(runs[m][s], "gold"), common)
                       for s in seeds] for m in runs}
    methods = {}
    for m in runs:
        lr, knob = chosen_settings(results, m)
        methods[m] = {"lr": lr, "knob": knob, "fe_per_iter": _mean([runs[m][s]["fe_per_iter"] for s in seeds]),
                      "median_s_per_iter": speed.get(m, _mean([runs[m][s]["median_s_per_iter"] for s in seeds])),
                      "s_per_iter_source": "throughput" if m in speed else "runs",
                      "final": {k: {**rules.t_interval(v), "per_seed": v} for k, v in finals[m].items()},
                      "final_ema": ema_finals(runs[m], seeds),
                      "time_to_target": reached[m], "gold_at_common_distance": {**rules.t_interval(at_distance[m]),
                                                                                "per_seed": at_distance[m]}}
    comparisons = {}
    for m in runs:
        if m == ref:
            continue
        ours, theirs = reached[ref], reached[m]
        s_ratio = speed[m] / speed[ref] if m in speed and ref in speed else None
        comparisons[m] = {
            "time_ratio_fe": rules.paired_ratio([r["fe"] for r in ours], [r["fe"] for r in theirs],
                                                [r["budget_fe"] for r in ours], [r["budget_fe"] for r in theirs]),
            "time_ratio_wall": rules.paired_ratio([r["wall_s"] for r in ours], [r["wall_s"] for r in theirs],
                                                  [r["budget_wall_s"] for r in ours],
                                                  [r["budget_wall_s"] for r in theirs]),
            **cost_split(ours, theirs, [runs[ref][s] for s in seeds], [runs[m][s] for s in seeds], s_ratio),
            "time_ratio_optimizer_steps": rules.paired_ratio(
                [r["optimizer_steps"] for r in ours], [r["optimizer_steps"] for r in theirs],
                [r["budget_optimizer_steps"] for r in ours], [r["budget_optimizer_steps"] for r in theirs])
            if all("optimizer_steps" in r for r in ours + theirs) else None,
            "no_worse_gold": rules.no_worse(finals[ref]["gold"], finals[m]["gold"]) if len(seeds) > 1 else None,
            "gold_at_common_distance_diff": rules.t_interval([a - b for a, b in zip(at_distance[ref], at_distance[m])]),
        }
    return {"base": base, "target": {"gold": target, "recomputed": recomputed, "frozen_from_earlier": frozen_target},
            "common_distance": common, "methods": methods, "comparisons": comparisons}


def _interval(summary: dict, digits: int = 3) -> str:
    if summary["low"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"


def _time_cell(reached: list[dict], key: str, budget_key: str, scale: float, unit: str) -> str:
    """Mean over seeds; with a censored seed its budget stands in and the entry is a lower bound."""
    values = [r[key] if r[key] is not None else r[budget_key] for r in reached]
    censored = sum(r[key] is None for r in reached)
    text = f"{_mean(values) / scale:.1f}{unit}"
    return f"> {text} ({len(reached) - censored}/{len(reached)} reached)" if censored else text


def markdown_report(results: dict) -> str:
    s, t = results["settings"], results["target"]
    ref = results["rules"]["reference_method"]
    parts = [k for k in GOLD_PARTS if all(k in d["final"] for d in results["methods"].values())]
    lines = [f"gold target: **{t['gold']:.4f}** = base {results['base']['gold']:.4f} + {rules.TARGET_FRACTION} x the "
             f"best method's mean final gain" + (f" (frozen from an earlier run; recomputed here: {t['recomputed']:.4f})"
                                                 if t["frozen_from_earlier"] is not None else ""),
             f"budget {s['budget_fe']:.0f} forward-equivalents per run; {s['cost_note']}; seeds {s['seeds']}; "
             f"{s['evals_per_run']} held-out evaluations per run x {s['eval_samples_per_prompt']} samples per prompt; "
             f"{_selection_note(results)}; intervals: 95% t over seeds, paired against {ref}; {_speed_note(results)}",
             "",
             "| method | lr | knob | FE/iter | s/iter | final gold | " + "".join(f"{k} | " for k in parts)
             + f"final proxy | time to target (kFE) | time to target (s) | X / {ref} time, FE | X / {ref} time, wall "
             f"| {ref} - X final gold (no worse?) | out of range | diversity (x base) | realism (NN dist) |",
             "|---" * (15 + len(parts)) + "|"]
    base = results["base"]
    for m, d in results["methods"].items():
        f = d["final"]
        c = results["comparisons"].get(m)
        ratio_fe = "-" if c is None else rules.format_ratio(c["time_ratio_fe"])
        ratio_wall = "-" if c is None else rules.format_ratio(c["time_ratio_wall"])
        if c is None or c["no_worse_gold"] is None:
            verdict = "-"
        else:
            nw = c["no_worse_gold"]
            verdict = f"{_interval(nw)} ({'yes' if nw['no_worse'] else 'no'})"
        realism = f"{f['realism']['mean']:.4f}" if "realism" in f else "-"
        lines.append(f"| {m} | {d['lr']:g} | {d.get('knob') or '-'} | {d['fe_per_iter']:.0f} | {d['median_s_per_iter']:.3f} "
                     f"| {_interval(f['gold'])} " + "".join(f"| {f[k]['mean']:.3f} " for k in parts)
                     + f"| {f['proxy']['mean']:.3f} | {_time_cell(d['time_to_target'], 'fe', 'budget_fe', 1000, '')} "
                     f"| {_time_cell(d['time_to_target'], 'wall_s', 'budget_wall_s', 1, '')} | {ratio_fe} | {ratio_wall} "
                     f"| {verdict} | {f['out_of_range']['mean']:.4f} | {f['diversity']['mean'] / base['diversity']:.3f} "
                     f"| {realism} |")
    lines += _split_lines(results, ref) + _crossing_lines(results, ref) + _ema_lines(results)
    lines += ["", f"Base model: gold {base['gold']:.4f}, " + "".join(f"{k} {base[k]:.4f}, " for k in parts)
              + f"proxy {base['proxy']:.4f}, out of range {base['out_of_range']:.4f}.",
              "", f"Overoptimization: gold at a common distance from the base model, d = {results['common_distance']:.4g} "
                  "(mean ||v_theta - v_ref||^2 per latent element on fixed held-out states; the farthest every run got)",
              "", f"| method | gold at d | {ref} - X |", "|---|---|---|"]
    for m, d in results["methods"].items():
        c = results["comparisons"].get(m)
        lines.append(f"| {m} | {_interval(d['gold_at_common_distance'])} "
                     f"| {'-' if c is None else _interval(c['gold_at_common_distance_diff'])} |")
    return "\n".join(lines)


def _selection_note(results: dict) -> str:
    s = results["settings"]
    if "selection" not in results:
        return f"lr by proxy AUC on seed {s['seeds'][0]} from {s['lrs']}"
    x3 = " + the x3 rule" if s.get("x3", s.get("grid")) else ""
    if s.get("max_lr_points"):
        x3 = f" widened in x3 steps until interior (at most {s['max_lr_points']} lrs)" if s.get("x3") else ""
    tuning = s.get("tuning_seeds") or s["seeds"][:1]
    on = f"tuning seeds {tuning} (never reported)" if not s.get("tuning_seeds_reported", True) else f"seed {tuning[0]}"
    if results["rules"].get("bands"):
        return f"lr from {s['lrs']}{x3} x each method's candidates, chosen by the gold-free rule on {on}"
    return f"lr from {s['lrs']}{x3} x each method's knob, chosen by proxy AUC on {on}"


def _speed_note(results: dict) -> str:
    t = results.get("throughput")
    if t is None:
        return "s/iter: the runs' own medians"
    return (f"s/iter: interleaved throughput measurement after the runs ({t['workers']} single-thread worker(s), "
            f"median of {t['iters_per_worker']} iterations each after {t['warmup']} warm-up)")


def _split_lines(results: dict, ref: str) -> list[str]:
    """X / reference time to target = iterations to target (progress per iteration) x cost per iteration."""
    lines = ["", f"Why: X / {ref} time to target = (iterations to target ratio: progress per iteration) x (cost per "
                 "iteration ratio)", "",
             f"| method | FE to target | = iterations to target | x FE/iter | wall-clock to target | = iterations "
             "to target | x s/iter |", "|---|---|---|---|---|---|---|"]
    for m, c in results["comparisons"].items():
        it = rules.format_ratio(c["time_ratio_iterations"])
        s_ratio = "-" if c["s_per_iter_ratio"] is None else f"{c['s_per_iter_ratio']:.2f}x"
        lines.append(f"| {m} | {rules.format_ratio(c['time_ratio_fe'])} | {it} | {c['fe_per_iter_ratio']:.2f}x "
                     f"| {rules.format_ratio(c['time_ratio_wall'])} | {it} | {s_ratio} |")
    return lines


def _crossing_lines(results: dict, ref: str) -> list[str]:
    """First and sustained crossings side by side, optimizer steps to target, and the gold on the side sampler's
    samples (issue #23); absent for tables that recorded neither."""
    runs = results["runs"]
    seeds = [str(s) for s in results["settings"]["seeds"]]
    side = all("side_gold" in runs[m][s]["curve"][-1] for m in runs for s in seeds)
    steps = all("optimizer_steps" in r for d in results["methods"].values() for r in d["time_to_target"])
    if not (side or steps or uses_sustained_crossing(results)):
        return []
    headline = "sustained" if uses_sustained_crossing(results) else "first"
    lines = ["", f"Time to target: the headline is the {headline} crossing (sustained: the first evaluation from which "
                 "the gold stays >= target to the end); optimizer steps to target beside forward-equivalents"
             + ("; final gold on the 8-step DPM-Solver++ samples beside the headline sampler's" if side else ""), "",
             f"| method | first crossing (kFE) | sustained crossing (kFE) | optimizer steps to target | X / {ref} "
             "optimizer steps | final gold (dpm8) |", "|---|---|---|---|---|---|"]
    for m, d in results["methods"].items():
        reached = d["time_to_target"]
        first = _time_cell([{**r, "fe": r["first_fe"]} for r in reached], "fe", "budget_fe", 1000, "")
        held = _time_cell([{**r, "fe": r["sustained_fe"]} for r in reached], "fe", "budget_fe", 1000, "")
        opt = _time_cell(reached, "optimizer_steps", "budget_optimizer_steps", 1, "") if steps else "-"
        c = results["comparisons"].get(m)
        ratio = "-" if c is None or c.get("time_ratio_optimizer_steps") is None else rules.format_ratio(
            c["time_ratio_optimizer_steps"])
        dpm8 = _interval(rules.t_interval([rules.final_value(_series(runs[m][s], "side_gold")) for s in seeds])) \
            if side else "-"
        lines.append(f"| {m} | {first} | {held} | {opt} | {ratio} | {dpm8} |")
    return lines


def _ema_lines(results: dict) -> list[str]:
    """The reference EMA's weights beside the live ones (the main table is live weights)."""
    rows = [(m, d) for m, d in results["methods"].items() if d.get("final_ema")]
    if not rows:
        return []
    lines = ["", "Reference EMA (each method's reference evaluates EMA weights; scored at the last "
                 f"{rules.FINAL_EVALUATIONS} points, final = their mean)", "",
             "| row | final gold | final proxy | EMA - live final gold |", "|---|---|---|---|"]
    for m, d in rows:
        e = d["final_ema"]
        diff = rules.t_interval([a - b for a, b in zip(e["gold"]["per_seed"], d["final"]["gold"]["per_seed"])])
        lines.append(f"| {m} (EMA) | {_interval(e['gold'])} | {e['proxy']['mean']:.3f} | {_interval(diff)} |")
    return lines


def compare_outputs(out: Path) -> list[Path]:
    """Every file a comparison (or a re-reading of one) writes: the JSON, its .md, and its two plots beside it."""
    return [out, out.with_suffix(".md"), out.parent / f"{out.stem}_curves.png",
            out.parent / f"{out.stem}_overoptimization.png"]


def read_frozen_target(path: str | Path) -> float:
    """The gold target frozen in an earlier results JSON (later tables report against it): `--frozen-target` of
    both `ngrpo compare` and this module's re-rendering takes that file, never a bare number."""
    import json

    try:
        target = float(json.loads(Path(path).read_text())["target"]["gold"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--frozen-target {str(path)!r}: expected a results JSON of ngrpo compare with "
                         f"target.gold ({error})") from None
    if not math.isfinite(target):
        raise ValueError(f"--frozen-target {str(path)!r}: its target.gold is {target}; expected a finite gold target")
    return target


def read_results(source: str | Path) -> dict:
    """A results JSON of ngrpo compare (or its .partial.json), checked for the parts a re-rendering reads."""
    import json

    try:
        results = json.loads(Path(source).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{str(source)!r}: expected a results JSON of ngrpo compare ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{str(source)!r}: expected a results JSON of ngrpo compare (a JSON object), got a "
                         f"{type(results).__name__}")
    for key, kind in (("runs", dict), ("settings", dict), ("rules", dict)):
        if not isinstance(results.get(key), kind):
            raise ValueError(f"{str(source)!r}: expected a results JSON of ngrpo compare (its {key!r} is missing or "
                             f"not a {kind.__name__})")
    if not isinstance(results["settings"].get("seeds"), list) or not all(
            isinstance(by_seed, dict) for by_seed in results["runs"].values()):
        raise ValueError(f"{str(source)!r}: expected a results JSON of ngrpo compare (settings.seeds a list, runs by "
                         "method then seed)")
    return results


def render(source: str | Path, out: str | Path, frozen_target: str | Path | None = None, reference: str | None = None,
           overwrite: bool = False) -> dict:
    """Re-derive the numbers, table and plots from saved runs: a finished results JSON, or the `.partial.json` of
    an interrupted one (only the seeds every method finished are used; the settings record which). `reference`
    pairs every ratio and "no worse" against another row (recorded in the rules as a re-reading); `frozen_target`
    is an earlier results JSON whose gold target the table reports against (as `ngrpo compare --frozen-target`)."""
    import json

    from neighbor_grpo.runs.io import atomic_write_text
    from neighbor_grpo.runs.ownership import check_file_outputs

    check_file_outputs(compare_outputs(Path(out)), overwrite)  # only the files it names are ever replaced
    results = read_results(source)
    target = read_frozen_target(frozen_target) if frozen_target is not None else None
    if reference is not None:
        if reference not in results["runs"]:
            raise ValueError(f"--reference: {reference!r} is not a row of {source}; choose from {list(results['runs'])}")
        recorded = results["rules"]["reference_method"]
        results["rules"] = {**results["rules"], "reference_method": reference, "recorded_reference_method": recorded}
    finished = [s for s in results["settings"]["seeds"] if all(str(s) in by_seed for by_seed in results["runs"].values())]
    if not finished:
        raise ValueError(f"{source}: no seed has finished runs of every method yet")
    results["settings"] = {**results["settings"], "seeds": finished}
    results["runs"] = {m: {str(s): by_seed[str(s)] for s in finished} for m, by_seed in results["runs"].items()}
    results.update(summarize(results, target))
    out = Path(out)
    plot_report(results, out.parent, out.stem)
    atomic_write_text(out.with_suffix(".md"), markdown_report(results) + "\n")
    atomic_write_text(out, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="re-render ngrpo compare's table and plots from saved runs")
    parser.add_argument("source", help="results JSON or its .partial.json")
    parser.add_argument("--out", required=True, help="results JSON to write (table and plots beside it)")
    parser.add_argument("--reference", help="pair every ratio against this row instead of the recorded one")
    parser.add_argument("--frozen-target", metavar="RESULTS_JSON",
                        help="report against the gold target frozen in this earlier results JSON (as ngrpo compare)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files --out names if they exist")
    args = parser.parse_args()
    from neighbor_grpo.runs.ownership import OwnershipError

    def fail(message: str) -> None:  # one line, as ngrpo's own commands (argparse's usage is for its own errors)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    try:
        print(markdown_report(render(args.source, args.out, args.frozen_target, args.reference, args.overwrite)))
    except (ValueError, OwnershipError) as error:
        fail(str(error))
    except KeyError as error:
        fail(f"{args.source!r}: expected a results JSON of ngrpo compare (it has no {error})")
    except (TypeError, AttributeError, IndexError) as error:  # a field of another shape than compare writes
        fail(f"{args.source!r}: expected a results JSON of ngrpo compare (a field has another shape: {error})")
