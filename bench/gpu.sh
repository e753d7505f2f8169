#!/usr/bin/env bash
# The prepared GPU benchmark (an H100/H200 box with JAX+CUDA, flax, optax, orbax and PyTorch; no internet).
# Within 8 minutes, most telling first: ours bf16 training at 448 with batch 16 (then a jax.profiler trace of
# two more iterations, summarised to the top 15 ops by time), the PyTorch reference training at batch 16 in
# float32, ours bf16 training at batch 16 and 64 with the joint schedule and with remat 'blocks' (and both),
# the --layers autodiff A/B, then the reference in autocast bf16, ours float32, evaluation and Grad-CAM of all
# four maps for a batch of 16 in bfloat16 (one jitted pass vs one image and block at a time); runs that would
# not start in time are skipped and named. JSON lines (images/s, MFU from the analytic FLOP count, peak
# memory, XLA's temporary-buffer size) are appended to OUT_FILE, then printed as a table; the profile table
# goes to OUT_FILE with .profile.md for its extension (the trace itself stays in a temporary folder).
#
#   bench/gpu.sh [OUT_FILE]          default OUT_FILE: bench/gpu_results.jsonl
#   bench/gpu.sh --tiny [OUT_FILE]   a tiny model at 64 px, one batch, on any machine (CPU: ~3 min); or PMG_BENCH_TINY=1
set -uo pipefail
cd "$(dirname "$0")/.."

tiny="${PMG_BENCH_TINY:-0}"
if [[ "${1:-}" == "--tiny" ]]; then tiny=1; shift; fi
out="${1:-bench/gpu_results.jsonl}"
budget_s="${PMG_BENCH_BUDGET_S:-480}"  # wall-clock cap of all runs together

if [[ "$tiny" == 1 ]]; then
  shared=(--size 64 --backbone resnet18 --width 8 --feature-size 16 --stage-sizes 1,1,1,1 --classes 5 --steps 2 --warmup 1)
  small=2 large=2
  cam_args=(--size 64 --backbone resnet18 --width 8 --feature-size 16 --stage-sizes 1,1,1,1 --steps 2)
else
  shared=(--size 448 --steps 5 --warmup 2)
  small=16 large=64
  cam_args=(--size 448 --steps 3)
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
if [[ "$tiny" != 1 ]]; then
  # A compilation cache shared by the runs: XLA:GPU keeps its per-fusion autotuning results there,
  # so a later run of kernels already tuned (another dtype or variant of the same model) compiles
  # faster and more runs fit the budget. Later runs' compile_s is then with a warm autotune cache.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"
fi

py="${PYTHON:-python3}"
# pmg_jax also needs grain and ml_collections (and grain's array_record, portpicker), which such a box
# may lack: carry them as wheels for its Python and they are unpacked into a private folder (no resolver:
# nothing can be downloaded there). Make the folder with, for a Python 3.12 box:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform any -d wheels grain ml_collections array_record portpicker importlib_resources
wheels="${PMG_WHEELS:-wheels}"
if ! "$py" -c "import grain, ml_collections, tqdm" 2>/dev/null; then
  if [[ ! -d "$wheels" ]]; then
    echo "bench/gpu.sh: grain/ml_collections/tqdm missing and no wheel folder $wheels (see the comment above)" >&2
    exit 1
  fi
  site="$(mktemp -d)/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "import grain, ml_collections, tqdm" || { echo "bench/gpu.sh: still missing after installing $wheels" >&2; exit 1; }
fi

trace_dir="$(mktemp -d)"
profile_out="${out%.*}.profile.md"
runs=(
  "train --batch $small --dtype bfloat16 --profile $trace_dir"
  "torch_bench --mode train --batch $small --dtype float32"
  "train --batch $small --dtype bfloat16 --schedule joint"
  "train --batch $small --dtype bfloat16 --remat blocks"
  "train --batch $small --dtype bfloat16 --layers autodiff"
  "train --batch $large --dtype bfloat16"
  "train --batch $large --dtype bfloat16 --schedule joint"
  "train --batch $large --dtype bfloat16 --remat blocks"
  "train --batch $small --dtype bfloat16 --schedule joint --remat blocks"
  "train --batch $large --dtype bfloat16 --schedule joint --remat blocks"
  "torch_bench --mode train --batch $small --dtype bfloat16"
  "train --batch $small --dtype float32"
  "eval --batch $small --dtype bfloat16"
  "cam --batch $small --dtype bfloat16"
  "eval --batch $large --dtype bfloat16"
  "train --batch $small --dtype bfloat16 --channel-sum gemv"
  "eval --batch $small --dtype float32"
  "eval --batch $large --dtype float32"
  "train --batch $large --dtype float32"
)

date -u +"# %Y-%m-%dT%H:%M:%SZ bench/gpu.sh tiny=$tiny" >&2
: > "$out"
declare -A seen
failed=0
for run in "${runs[@]}"; do
  [[ -n "${seen[$run]:-}" ]] && continue
  if [[ "$tiny" == 1 ]]; then
    # A/B variants: not needed to keep the script alive (tests/test_bench.py checks the forms they force);
    # of the schedule and remat variants, the one that sets both keeps both flags alive
    [[ "$run" == *--channel-sum* || "$run" == *--layers* ]] && continue
    [[ "$run" == *--schedule* && "$run" != *--remat* || "$run" == *--remat* && "$run" != *--schedule* ]] && continue
    # the large batch is the small one here: its plain run repeats the profiled one
    [[ "$run" == "train --batch $large --dtype bfloat16" ]] && continue
  fi
  seen[$run]=1
  left=$((budget_s - SECONDS))
  if ((left < 30)); then
    echo "skipped, out of time: $run" >&2
    continue
  fi
  read -r script args <<<"$run"
  common=("${shared[@]}")
  [[ "$script" == cam ]] && common=("${cam_args[@]}")  # cam.py has no --warmup/--classes
  # shellcheck disable=SC2086  # args is a word list on purpose
  if ! timeout "$left" "$py" -m "bench.$script" "${common[@]}" $args >>"$out"; then
    echo "failed or timed out: $run" >&2
    failed=1
  fi
  tail -n 1 "$out"
  if [[ "$args" == *--profile* ]]; then
    "$py" -m bench.profile_summary "$trace_dir" --top 15 --steps 2 >"$profile_out" || failed=1
    cat "$profile_out"
  fi
done
"$py" -m bench.report "$out"
exit "$failed"
