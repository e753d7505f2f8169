"""Markdown table of the headline and ratio records in benchmark JSON-lines files.

python -m bench.report bench/gpu_results.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import json

COLUMNS = (
    "bench",
    "device_kind",
    "size",
    "batch",
    "dtype",
    "images_per_s",
    "step_s_median",
    "compile_s",
    "mfu",
    "peak_memory_gib",
    "xla_temp_gib",
)
# A/B and accelerator options of bench/train.py, with their defaults: a headline names those it changes.
VARIANTS = {
    "channel_sum": "auto",
    "layers": "custom",
    "remat": "none",
    "schedule": "progressive",
    "accumulation_steps": 1,
}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def rows(lines: list[str]) -> list[dict]:
    """Headline records (peak memory in GiB) and compare ratios, in file order."""
    out = []
    for line in lines:
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("kind") == "headline" and "images_per_s" in record:
            changed = [f"{k}={record[k]}" for k, default in VARIANTS.items() if record.get(k, default) != default]
            name = record["bench"] if not changed else f"{record['bench']} ({', '.join(changed)})"
            temp = record.get("xla_temp_bytes")
            out.append(
                {
                    **record,
                    "bench": name,
                    "peak_memory_gib": record["peak_memory_bytes"] / 2**30,
                    "xla_temp_gib": None if temp is None else temp / 2**30,
                }
            )
        elif record.get("kind") == "ratio" and "case" in record:
            out.append(
                {
                    "bench": f"compare {record['case']} ours/reference = {record['ratio']:.2f}",
                    "dtype": record["dtype"],
                    "images_per_s": record["ours_images_per_s"],
                }
            )
        elif record.get("kind") == "ratio":
            out.append(
                {
                    "bench": f"train ({record['variant']}) time / ({record['baseline']}) = {record['time_ratio']:.2f}",
                    "size": record["size"],
                    "batch": record["batch"],
                    "dtype": record["dtype"],
                    "images_per_s": record["images_per_s"],
                    "step_s_median": record["step_s_median"],
                }
            )
    return out


def table(records: list[dict]) -> str:
    """The records as a markdown table over COLUMNS."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in records]
    return "\n".join([head, *body])


def speedups(records: list[dict]) -> list[str]:
    """Ours/reference images/s for each of our train and eval headlines that has a reference float32
    headline of the same bench, device, size and batch (the issue's measure: bf16 ours vs float32 reference)."""
    reference = {
        (r["bench"][len("torch_") :], r.get("device_kind"), r.get("size"), r.get("batch")): r
        for r in records
        if r["bench"].startswith("torch_") and r.get("dtype") == "float32"
    }
    lines = []
    for r in records:
        ref = reference.get((r["bench"].split(" (")[0], r.get("device_kind"), r.get("size"), r.get("batch")))
        if ref is not None:
            lines.append(
                f"{r['bench']} {r['dtype']} batch {r['batch']} on {r.get('device_kind')}: "
                f"{r['images_per_s'] / ref['images_per_s']:.2f}x the reference's float32"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    lines = []
    for path in args.files:
        with open(path) as f:
            lines.extend(f)
    records = rows(lines)
    print(table(records))
    for line in speedups(records):
        print(line)


if __name__ == "__main__":
    main()
