"""The ops that took the most time in a jax.profiler trace, as a markdown table.

    python -m bench.profile_summary TRACE_FOLDER [--top 15] [--steps N]

Reads the newest trace under TRACE_FOLDER that `jax.profiler.trace(folder, create_perfetto_trace=True)`
wrote (plugins/profile/<run>/perfetto_trace.json.gz, or the <host>.trace.json.gz beside it): Chrome
trace events, of which those with an `hlo_op` argument are XLA's operations as they ran. Where the
trace has device planes (a GPU's streams, process names '/device:...'), only their events count: the
time is the kernels'. Otherwise (CPU) the host threads' op events count, summed over threads, so
ops that ran side by side both count. Each row is one HLO op of one module: how often it ran, its
total and mean time, and its share of all op time; --steps N adds the milliseconds per iteration.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib


def find_trace(folder: str) -> pathlib.Path:
    """The newest profiler run's trace-event file under `folder`; FileNotFoundError naming it otherwise."""
    files = [
        p for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz") for p in pathlib.Path(folder).rglob(pattern)
    ]
    if not files:
        raise FileNotFoundError(
            f"{folder}: no perfetto_trace.json.gz or *.trace.json.gz (a jax.profiler.trace "
            f"folder written with create_perfetto_trace=True)"
        )
    newest_run = max(p.parent for p in files)  # run folders are named by their start time
    run_files = [p for p in files if p.parent == newest_run]
    return next((p for p in run_files if p.name == "perfetto_trace.json.gz"), run_files[0])


def op_times(events: list[dict]) -> dict[tuple[str, str], list[float]]:
    """{(hlo_module, hlo_op): [microseconds of each run]} over the device planes' events, or the host's
    where the trace has no device plane."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    on_device = [e for e in ops if names.get(e["pid"], "").startswith("/device:")]
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in on_device or ops:
        times[e["args"].get("hlo_module", ""), e["args"]["hlo_op"]].append(float(e.get("dur", 0.0)))
    return dict(times)


def summarise(folder: str, top: int = 15, steps: int = 0) -> list[dict]:
    """The `top` ops by total time in the newest trace under `folder`, largest first."""
    path = find_trace(folder)
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    times = op_times(events)
    if not times:
        raise ValueError(f"{path}: no XLA op events (events with an hlo_op argument)")
    total = sum(sum(t) for t in times.values())
    rows = []
    for (module, op), t in sorted(times.items(), key=lambda item: -sum(item[1]))[:top]:
        row = {
            "op": op,
            "module": module,
            "count": len(t),
            "total_ms": sum(t) / 1e3,
            "mean_us": sum(t) / len(t),
            "share": sum(t) / total,
            "trace": str(path),
        }
        if steps:
            row["ms_per_step"] = sum(t) / 1e3 / steps
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    per_step = "ms_per_step" in rows[0]
    head = "| # | op | module | count | total ms | mean us | share |" + (" ms/step |" if per_step else "")
    lines = [head, "|" + "---|" * (7 + per_step)]
    for i, r in enumerate(rows, start=1):
        line = (
            f"| {i} | {r['op']} | {r['module']} | {r['count']} | {r['total_ms']:.2f} | {r['mean_us']:.1f} | "
            f"{100 * r['share']:.1f}% |"
        )
        lines.append(line + (f" {r['ms_per_step']:.2f} |" if per_step else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder given to jax.profiler.trace (e.g. bench.train --profile)")
    parser.add_argument("--top", type=int, default=15, help="ops to list")
    parser.add_argument("--steps", type=int, default=0, help="iterations the trace holds (adds ms per step)")
    args = parser.parse_args(argv)
    try:
        rows = summarise(args.folder, args.top, args.steps)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"bench.profile_summary: {e}\n")
    print(f"top {len(rows)} ops of {rows[0]['trace']}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
