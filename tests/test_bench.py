"""Benchmarks cannot rot: the FLOP counter agrees with the model's own ops, bn_stats='used' does
what it says, and bench/gpu.sh --tiny, bench/compare.py and bench/input_pipeline.py run end to
end on this CPU."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from bench import common, flops
from pmg_jax import kernels
from pmg_jax.model import PMG
from pmg_jax.optim import make_optimizer
from pmg_jax.state import create_state
from pmg_jax.steps import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_classes": 5, "backbone": "resnet50", "width": 8, "feature_size": 16, "stage_sizes": (1, 2, 1, 1)}


# An independent count for the ResNet PMG, by hand from torchvision's architecture.
RESNET_STAGES = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _conv(size: int, cin: int, cout: int, kernel: int, stride: int = 1, pad: int = 0) -> tuple[int, int]:
    """(MACs, output side) of one square conv on a size x size map."""
    out = _out(size, kernel, stride, pad)
    return out * out * cin * cout * kernel * kernel, out


def _residual_block(size: int, cin: int, planes: int, stride: int, bottleneck: bool) -> tuple[int, int, int]:
    """(MACs, output side, output channels) of a torchvision Bottleneck or BasicBlock."""
    cout = planes * (4 if bottleneck else 1)
    if bottleneck:
        m1, _ = _conv(size, cin, planes, 1)
        m2, out = _conv(size, planes, planes, 3, stride, 1)
        m3, _ = _conv(out, planes, cout, 1)
        macs = m1 + m2 + m3
    else:
        m1, out = _conv(size, cin, planes, 3, stride, 1)
        m2, _ = _conv(out, planes, planes, 3, 1, 1)
        macs = m1 + m2
    if stride != 1 or cin != cout:
        macs += _conv(size, cin, cout, 1, stride)[0]
    return macs, out, cout


def forward_macs(
    size: int,
    num_classes: int,
    backbone: str = "resnet50",
    width: int = 64,
    feature_size: int = 512,
    stage_sizes: tuple[int, ...] | None = None,
) -> int:
    """Multiply-accumulates of one PMG forward on one size x size image (all four heads)."""
    bottleneck = backbone != "resnet18"
    macs, side = _conv(size, 3, width, 7, 2, 3)
    side = _out(side, 3, 2, 1)  # max pool
    channels, stages = width, []
    for i, blocks in enumerate(stage_sizes or RESNET_STAGES[backbone]):
        for j in range(blocks):
            m, side, channels = _residual_block(side, channels, width * 2**i, 2 if i > 0 and j == 0 else 1, bottleneck)
            macs += m
        stages.append((side, channels))
    return macs + _pmg_macs(stages, feature_size, num_classes)


def _pmg_macs(stages: list[tuple[int, int]], feature_size: int, num_classes: int) -> int:
    """MACs of PMG's blocks and heads on the last three of the backbone's (side, channels) stage maps."""
    hidden, macs = 2 * feature_size, 0
    for side, channels in stages[1:]:
        macs += _conv(side, channels, feature_size, 1)[0] + _conv(side, feature_size, hidden, 3, 1, 1)[0]
        macs += hidden * feature_size + feature_size * num_classes
    return macs + 3 * hidden * feature_size + feature_size * num_classes


def convnext_forward_macs(
    size: int, num_classes: int, width: int = 96, stage_sizes=(3, 3, 9, 3), feature_size: int = 512
) -> int:
    """The same for a ConvNeXt PMG, from timm's ConvNeXt: a 7x7 depthwise conv is 49 MACs per output value."""
    macs, side = _conv(size, 3, width, 4, 4)  # the patchify stem
    stages = []
    for i, blocks in enumerate(stage_sizes):
        channels = width * 2**i
        if i > 0:  # LayerNorm, then a 2x2 stride-2 conv
            m, side = _conv(side, channels // 2, channels, 2, 2)
            macs += m
        macs += blocks * side * side * (channels * 49 + 2 * channels * 4 * channels)  # depthwise, then the MLP
        stages.append((side, channels))
    return macs + _pmg_macs(stages, feature_size, num_classes)


@pytest.mark.parametrize(
    "size,model",
    [
        (448, {"num_classes": 200}),
        (224, {"num_classes": 200, "backbone": "resnet18"}),
        (96, TINY),
    ],
)
def test_flop_counter_matches_a_count_by_hand(size, model):
    """The jaxpr-based counter equals the architecture's convolutions and linear layers counted by hand."""
    assert flops.eval_flops(2, size=size, **model) == 2 * 2 * forward_macs(size, **model)
    assert flops.train_iteration_flops(2, size=size, **model) == 12 * flops.eval_flops(2, size=size, **model)


@pytest.mark.parametrize(
    "size,model",
    [
        (224, {"num_classes": 200}),
        (64, {"num_classes": 5, "width": 8, "stage_sizes": (1, 2, 1, 1), "feature_size": 16}),
    ],
)
def test_flop_counter_counts_convnext_depthwise_convolutions_per_group(size, model):
    got = flops.forward_macs(size=size, backbone="convnext_tiny", **model)
    assert got == convnext_forward_macs(size, **model)


def test_peak_flops_table():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
    assert flops.peak_flops("NVIDIA H200", "float32") == 495e12
    assert flops.peak_flops("cpu", "float32") is None


@pytest.mark.slow  # compiles two full training steps for their cost analysis
def test_bn_stats_used_keeps_learning_and_skips_dead_forward():
    """Same parameters after an iteration (BN normalises with batch statistics in training), fewer FLOPs,
    and only the running statistics of the trunk up to layer2 (which feeds every pass) left as 'all' has them."""
    net = PMG(**TINY)
    tx = make_optimizer(lr_new=0.01, lr_backbone=0.01, num_epochs=2, steps_per_epoch=10)
    state = create_state(net, tx, seed=0, image_size=64)
    data = common.synthetic_batch(64, 4, TINY["num_classes"])
    batch = {"image": jnp.asarray(data["image"]), "label": jnp.asarray(data["label"])}
    results = {}
    for mode in ("all", "used"):
        compiled = jax.jit(make_train_step(net, tx, bn_stats=mode)).lower(state, batch).compile()
        cost = compiled.cost_analysis()
        new_state, metrics = compiled(state, batch)
        assert int(metrics["nonfinite_pass"]) == 0
        results[mode] = (new_state, (cost[0] if isinstance(cost, list) else cost)["flops"])
    (all_state, all_flops), (used_state, used_flops) = results["all"], results["used"]
    assert used_flops < 0.97 * all_flops, (used_flops, all_flops)  # 6% here, 16% for ResNet50 PMG: dead code dropped
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), all_state.params, used_state.params
    )
    for path, a in flatten_dict(all_state.batch_stats).items():
        b = flatten_dict(used_state.batch_stats)[path]
        shared = path[0] == "features" and not path[1].startswith(("layer3", "layer4"))
        assert np.allclose(a, b, rtol=1e-6, atol=1e-7) == shared, path
    with pytest.raises(ValueError, match="bn_stats"):
        make_train_step(net, tx, bn_stats="some")


SMOKE = ["--backbone", "resnet18", "--width", "8", "--feature-size", "16", "--stage-sizes", "1,1,1,1", "--classes", "5"]


@pytest.mark.slow
def test_gpu_sh_tiny_runs_every_benchmark(tmp_path):
    out = tmp_path / "gpu.jsonl"
    proc = subprocess.run(
        ["bash", "bench/gpu.sh", "--tiny", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PMG_BENCH_BUDGET_S": "1100"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    headlines = [json.loads(line) for line in open(out) if '"headline"' in line]
    assert {(h["bench"], h["dtype"]) for h in headlines} == {("cam", "bfloat16")} | {
        (bench, dtype) for bench in ("train", "eval", "torch_train") for dtype in ("float32", "bfloat16")
    }
    for h in headlines:
        assert h["images_per_s"] > 0 and h["peak_memory_bytes"] > 0, h
        if h["bench"] == "cam":
            assert h["ratio"] > 0 and h["seed_way_images_per_s"] > 0, h
        else:
            assert h["model_tflops_per_step"] > 0 and h["compile_s"] >= 0 and h["warmup_s"] > 0, h
    # bfloat16 (with the profile; tiny's large batch is the same 2), float32 at both (one run)
    assert "| bench |" in proc.stdout and proc.stdout.count("\n| train |") == 2
    assert proc.stdout.count("\n| train (remat=blocks, schedule=joint) |") == 1  # the one accelerator variant
    assert "train bfloat16 batch 2 on cpu: " in proc.stdout and "x the reference's float32" in proc.stdout
    assert all(h["xla_temp_bytes"] > 0 for h in headlines if h["bench"] == "train")
    profile = (tmp_path / "gpu.profile.md").read_text()  # the profile of the first run, summarised
    assert "| # | op | module |" in profile and profile.count("\n| ") == 1 + 15 and profile in proc.stdout


def test_train_bench_can_force_either_channel_sum_form():
    from bench import train as train_bench

    choice = lambda form: train_bench.kernel_choice(train_bench.parse(["--channel-sum", form]))
    assert choice("auto") == kernels.Kernels()
    x = jnp.arange(24.0).reshape(2, 3, 4)
    # one function per choice: a jitted (or make_jaxpr'd) function keeps its first trace
    bn = lambda form: kernels.traced(
        lambda a: kernels.batch_norm_train(a, jnp.ones(4), jnp.zeros(4), 1e-5, jnp.dtype(jnp.float32)), choice(form)
    )
    # BatchNorm's statistics go through the forced form and agree with the default's
    _, mean, _ = bn("reduce")(x)
    np.testing.assert_allclose(mean, np.asarray(x).mean((0, 1)), rtol=1e-6)
    assert "dot_general" not in str(jax.make_jaxpr(bn("reduce"))(x))
    assert "reduce_sum" not in str(jax.make_jaxpr(bn("gemv"))(x))


@pytest.mark.slow
def test_train_bench_autodiff_layers_compute_the_same_iteration():
    """--layers autodiff (the A/B for platforms other than XLA:CPU) swaps in the plain 1x1
    convolution, BatchNorm and max pool with JAX's own gradients: one training iteration moves
    the parameters and statistics as the hand-written gradients do, and the traced step holds
    the plain primitives."""
    from bench import train as train_bench

    net = PMG(**TINY)
    # a small learning rate: at 0.01 this tiny model's four passes amplify float32 rounding so
    # much that even the two channel-sum forms end an iteration 10% apart
    tx = make_optimizer(lr_new=1e-4, lr_backbone=1e-4, num_epochs=2, steps_per_epoch=10)
    state = create_state(net, tx, seed=0, image_size=64)
    data = common.synthetic_batch(64, 4, TINY["num_classes"])
    batch = {"image": jnp.asarray(data["image"]), "label": jnp.asarray(data["label"])}
    results = {}
    for kind in ("custom", "autodiff"):
        step = kernels.traced(
            make_train_step(net, tx), train_bench.kernel_choice(train_bench.parse(["--layers", kind]))
        )
        results[kind] = (jax.jit(step)(state, batch)[0], str(jax.make_jaxpr(step)(state, batch)))
    (custom, custom_jaxpr), (plain, plain_jaxpr) = results["custom"], results["autodiff"]
    assert "custom_vjp_call" in custom_jaxpr and "reduce_window_max" not in custom_jaxpr
    assert "custom_vjp_call" not in plain_jaxpr and "reduce_window_max" in plain_jaxpr
    # Both against the same iteration in float64 (the truth), not against each other: how far a float32
    # convolution gradient lands from it depends on the CPU's kernels (tests/truth.py).
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
        )
        truth = jax.jit(make_train_step(PMG(**TINY, dtype=jnp.float64), tx))(as64(state), as64(batch))[0]
    flat = lambda tree: {k: np.asarray(v, np.float64) for k, v in flatten_dict(tree).items()}
    start, want = flat(state.params), flat(truth.params)
    moves = {k: want[k] - start[k] for k in start}
    largest = max(float(np.abs(m).max()) for m in moves.values())
    assert largest > 1e-3  # the iteration did move the parameters
    for name, got in (("custom", custom), ("autodiff", plain)):
        got_params, got_stats, want_stats = flat(got.params), flat(got.batch_stats), flat(truth.batch_stats)
        for k, m in moves.items():
            np.testing.assert_allclose(got_params[k] - start[k], m, atol=1e-3 * largest, err_msg=f"{name} {k}")
        for k, w in want_stats.items():
            np.testing.assert_allclose(got_stats[k], w, rtol=1e-4, atol=1e-6, err_msg=f"{name} {k}")
    with pytest.raises(SystemExit):
        train_bench.parse(["--layers", "fast"])


def test_bench_winograd_off_makes_every_convolution_direct():
    from bench import train as train_bench

    x, w = jnp.zeros((8, 56, 56, 256)), jnp.zeros((3, 3, 256, 256))
    assert kernels.use_winograd(x.shape, w.shape, 1, 1, x.dtype)  # the shape qualifies ...
    for flag, winograd in (("auto", True), ("off", False)):
        conv = kernels.traced(
            lambda x, w: kernels.conv2d(x, w, 1, 1), train_bench.kernel_choice(train_bench.parse(["--winograd", flag]))
        )
        jaxpr = str(jax.make_jaxpr(conv)(x, w))
        assert ("platform_index" in jaxpr) == winograd, flag  # ... and only 'auto' takes the Winograd path
    with pytest.raises(ValueError, match="winograd"):
        kernels.Kernels(winograd="on")


@pytest.mark.slow
def test_train_bench_alternates_variants_and_reports_their_time_ratios(capsys):
    from bench import train as train_bench

    headline = train_bench.main(
        [
            "--size",
            "64",
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "0",
            *SMOKE,
            "--schedule",
            "joint",
            "--remat",
            "none,stages",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = ["remat=none,schedule=joint", "remat=stages,schedule=joint"]
    steps = [(l["variant"], l["round"]) for l in lines if l.get("kind") == "step"]
    assert steps == [(names[0], 0), (names[1], 0), (names[0], 1), (names[1], 1)]
    seconds = {n: sorted(l["seconds"] for l in lines if l.get("kind") == "step" and l["variant"] == n) for n in names}
    ratio = next(l for l in lines if l.get("kind") == "ratio" and l["variant"] == names[1])
    assert ratio["time_ratio"] == pytest.approx(np.median(seconds[names[1]]) / np.median(seconds[names[0]]))
    assert ratio["speed_ratio"] == pytest.approx(1 / ratio["time_ratio"]) and ratio["xla_temp_bytes"] > 0
    assert lines[-1] == headline and headline["time_ratios"] == {names[0]: 1.0, names[1]: ratio["time_ratio"]}
    with pytest.raises(SystemExit):
        train_bench.parse(["--remat", "none,all"])
    with pytest.raises(SystemExit):
        train_bench.parse(["--remat", "none,blocks", "--profile", "/tmp/trace"])


@pytest.mark.slow
def test_memory_bench_reads_xla_buffer_sizes_per_case(capsys):
    from bench import memory

    records = memory.main(
        ["--size", "64", "--batch", "4", *SMOKE, "--cases", "float32:none:1:joint,float32:stages:2:joint"]
    )
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in out[:2]] == records
    for r in records:
        assert r["temp_size_in_bytes"] > 0 and r["argument_size_in_bytes"] > 0
        assert r["total_bytes"] == (
            r["argument_size_in_bytes"] + r["output_size_in_bytes"] - r["alias_size_in_bytes"] + r["temp_size_in_bytes"]
        )
    assert [(r["remat"], r["accumulation_steps"]) for r in records] == [("none", 1), ("stages", 2)]
    assert out[2].startswith("| dtype | remat |") and out[4].startswith("| float32 | none | 1 | joint |")
    with pytest.raises(SystemExit):
        memory.parse(["--cases", "float32:all:1:joint"])


@pytest.mark.slow
def test_compare_alternates_and_reports_a_ratio(capsys):
    from bench import compare

    headline = compare.main(["--cases", "eval:64:2", "--rounds", "2", "--pause", "0", *SMOKE])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps = [(l["impl"], l["round"]) for l in lines if l.get("kind") == "step"]
    assert steps == [("ours", 1), ("reference", 1), ("ours", 2), ("reference", 2)]
    assert all(l["minor_page_faults"] >= 0 for l in lines if l.get("kind") == "step")
    ratio = next(l for l in lines if l.get("kind") == "ratio")
    assert lines[-1] == headline and headline["ratios"] == {"eval:64:2": ratio["ratio"]} and ratio["ratio"] > 0
    assert headline["torch_threads"] == common.cpu_threads()


@pytest.mark.slow
def test_compare_in_fresh_processes_takes_the_median_ratio(capsys):
    from bench import compare

    headline = compare.main(["--cases", "eval:64:2", "--rounds", "1", "--pause", "0", "--processes", "3", *SMOKE])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ratios = [l["ratio"] for l in lines if l.get("kind") == "ratio"]
    assert [l["process"] for l in lines if l.get("kind") == "ratio"] == [0, 1, 2]
    assert len({l["process"] for l in lines if l.get("kind") == "step"}) == 3
    assert headline["ratios_per_process"] == {"eval:64:2": ratios}
    assert headline["ratios"] == {"eval:64:2": sorted(ratios)[1]} and lines[-1] == headline


@pytest.mark.slow
def test_input_pipeline_bench_runs_and_its_goal_follows_from_its_figures():
    proc = subprocess.run(
        ["python", "-m", "bench.input_pipeline", "--images", "8", "--batch", "4", "--batches", "2", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    pipes = {(l["measurement"], l["workers"]): l for l in lines if l["measurement"].startswith("pipeline_")}
    assert set(pipes) == {(f"pipeline_{o}", w) for o in ("float32", "uint8") for w in (0, 1, 2)}
    assert all(p["images_per_s"] > 0 and p["raw_1_thread_images_per_s_just_before"] > 0 for p in pipes.values())
    goals = {l["measurement"]: l for l in lines if l["measurement"].startswith("goal_")}
    for output in ("float32", "uint8"):
        two = pipes[f"pipeline_{output}", 2]
        goal = goals[f"goal_{output}_2_workers_vs_2x_raw_1_thread"]
        assert (goal["images_per_s"], goal["raw_1_thread_images_per_s"]) == (
            two["images_per_s"],
            two["raw_1_thread_images_per_s_just_before"],
        )  # one round: the same pair
        want = goal["images_per_s"] / (2 * goal["raw_1_thread_images_per_s"])
        assert goal["ratio"] == pytest.approx(want, abs=2e-3) and goal["met"] == (goal["ratio"] >= 0.8)
    assert lines[-1]["measurement"] == "goal_uint8_2_workers_vs_2x_raw_1_thread"  # the headline last


@pytest.mark.slow
def test_train_bench_times_the_two_methods_side_by_side(capsys):
    """`--method pmg,pmg_v2` compiles each method's own step (PMG-V2's on anchors and positives) and times them in
    turn, reporting PMG-V2's time as a ratio to PMG's."""
    from bench import train as train_bench

    headline = train_bench.main(
        ["--size", "64", "--batch", "2", "--steps", "1", "--warmup", "0", *SMOKE, "--method", "pmg,pmg_v2"]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = ["remat=none,schedule=progressive,method=pmg", "remat=none,schedule=progressive,method=pmg_v2"]
    assert [l["variant"] for l in lines if l.get("kind") == "step"] == names
    assert set(headline["time_ratios"]) == set(names) and headline["time_ratios"][names[0]] == 1.0
    with pytest.raises(SystemExit):  # PMG-V2 has no joint schedule
        train_bench.parse(["--method", "pmg_v2", "--schedule", "joint"])
