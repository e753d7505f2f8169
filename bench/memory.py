"""Memory of the compiled training step by XLA's own buffer assignment, per remat, accumulation and schedule.

    python -m bench.memory [--size 448 --batch 16] [--cases float32:none:1:progressive,...]

Compiles the step training runs (`steps.compile_steps`) for each case and reads
`compiled.memory_analysis()`: the temporary buffers XLA assigns (activations kept for the
backward, workspace), the arguments (state and batch) and outputs, without running the step.
A case is dtype:remat:accumulation_steps:schedule; the default cases are every remat setting in
float32 and bfloat16, accumulation over 2 and 4 micro-batches and the joint schedule in float32.
Prints one JSON line per case, then a markdown table. On CPU the figures are XLA:CPU's buffer
assignment (its fusion and scheduling, Winograd convolutions in float32); a GPU assigns its own.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bench import common
from pmg_jax import model as model_lib
from pmg_jax import parallel
from pmg_jax import state as state_lib
from pmg_jax import steps as steps_lib

DEFAULT_CASES = (
    *(f"{dtype}:{remat}:1:progressive" for dtype in ("float32", "bfloat16") for remat in model_lib.REMAT),
    "float32:none:2:progressive",
    "float32:none:4:progressive",
    "float32:none:1:joint",
)
FIELDS = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
)


def _case(text: str) -> tuple[str, str, int, str]:
    dtype, remat, k, schedule = text.split(":")
    if dtype not in ("float32", "bfloat16") or remat not in model_lib.REMAT or schedule not in model_lib.SCHEDULES:
        raise argparse.ArgumentTypeError(
            f"case {text!r}: want float32|bfloat16 : {'|'.join(model_lib.REMAT)} : "
            f"accumulation steps : {'|'.join(model_lib.SCHEDULES)}"
        )
    return dtype, remat, int(k), schedule


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--cases",
        type=lambda s: [_case(c) for c in s.split(",")],
        default=[_case(c) for c in DEFAULT_CASES],
        help="comma-separated dtype:remat:k:schedule",
    )
    return parser.parse_args(argv)


def analyse(args: argparse.Namespace, dtype: str, remat: str, k: int, schedule: str) -> dict:
    """Compile the training step of one case over abstract inputs and return its memory record."""
    config = common.make_config(
        argparse.Namespace(**{**vars(args), "dtype": dtype}), schedule=schedule, accumulation_steps=k
    )
    config.model.remat = remat
    model = state_lib.create_model(config)
    tx = common.make_tx(config)
    mesh = parallel.make_mesh()
    state = jax.eval_shape(lambda: state_lib.create_state(model, tx, config.seed, args.size))
    batch = {
        "image": jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32),
    }
    train_step, _ = steps_lib.compile_steps(model, tx, config, mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    record = {
        "bench": "memory",
        "kind": "case",
        "size": args.size,
        "batch": args.batch,
        "dtype": dtype,
        "remat": remat,
        "accumulation_steps": k,
        "schedule": schedule,
        "backbone": args.backbone,
        "compile_s": compile_s,
        **{f: int(getattr(analysis, f)) for f in FIELDS},
        **common.device_info(),
    }
    # what the step holds at once at most: its arguments, its outputs that do not reuse them, the temporaries
    record["total_bytes"] = (
        record["argument_size_in_bytes"]
        + record["output_size_in_bytes"]
        - record["alias_size_in_bytes"]
        + record["temp_size_in_bytes"]
    )
    return record


def table(records: list[dict]) -> str:
    """Markdown table of the cases: GiB of temporaries and in all, and the temporaries against the first case
    of the same dtype with remat none, one micro-batch and the progressive schedule."""
    gib = 2**30
    base = {
        r["dtype"]: r["temp_size_in_bytes"]
        for r in records
        if (r["remat"], r["accumulation_steps"], r["schedule"]) == ("none", 1, "progressive")
    }
    lines = [
        "| dtype | remat | accumulation | schedule | temp GiB | vs none | arguments GiB | total GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ratio = r["temp_size_in_bytes"] / base[r["dtype"]] if base.get(r["dtype"]) else None
        lines.append(
            f"| {r['dtype']} | {r['remat']} | {r['accumulation_steps']} | {r['schedule']} | "
            f"{r['temp_size_in_bytes'] / gib:.2f} | {'-' if ratio is None else f'{ratio:.2f}'} | "
            f"{r['argument_size_in_bytes'] / gib:.2f} | {r['total_bytes'] / gib:.2f} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Analyse every case in this process, one JSON line each, then print the table; returns the records."""
    args = parse(argv)
    records = []
    for case in args.cases:
        records.append(analyse(args, *case))
        common.emit(records[-1])
    print(table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
