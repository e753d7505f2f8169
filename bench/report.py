"""Markdown table of the headline and ratio records in benchmark JSON-lines files.

    python -m bench.report bench/gpu_results.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import json

COLUMNS = ("bench", "device_kind", "size", "batch", "dtype", "images_per_s", "step_s_median", "compile_s",
           "mfu", "peak_memory_gib")


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
            out.append({**record, "peak_memory_gib": record["peak_memory_bytes"] / 2**30})
        elif record.get("kind") == "ratio":
            out.append({"bench": f"compare {record['case']} ours/reference = {record['ratio']:.2f}",
                        "dtype": record["dtype"], "images_per_s": record["ours_images_per_s"]})
    return out


def table(records: list[dict]) -> str:
    """The records as a markdown table over COLUMNS."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in records]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    lines = [line for path in args.files for line in open(path)]
    print(table(rows(lines)))


if __name__ == "__main__":
    main()
