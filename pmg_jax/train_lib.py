"""Train state, the progressive training step, evaluation, and the training loop."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import jigsaw as jigsaw_lib
from pmg_jax import layers, parallel, validate, xla_options
from pmg_jax.data import pipeline, slots, sources
from pmg_jax.model import PMG
from pmg_jax.optim import make_optimizer

log = logging.getLogger(__name__)

HEAD_NAMES = ("head1", "head2", "head3", "concat", "combined")
LOSS_NAMES = ("loss1", "loss2", "loss3", "loss_concat")
EVAL_PREFETCH = 2  # batches each input worker buffers during evaluation


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (all replicated over the mesh)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def create_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> PMG:
    """The PMG module a config describes."""
    m = config.model
    return PMG(
        num_classes=num_classes or config.dataset.num_classes,
        backbone=m.backbone,
        feature_size=m.feature_size,
        width=m.width,
        stage_sizes=tuple(m.stage_sizes) if m.stage_sizes else None,
        dtype=jnp.dtype(m.dtype),
    )


def init_variables(model: PMG, key: jax.Array, image_size: int) -> dict:
    """params and batch_stats (float32), without the CAM-only collections."""
    variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def create_state(model: PMG, tx: optax.GradientTransformation, seed: int, image_size: int) -> TrainState:
    """A fresh state: PyTorch-style initialisation, zero momentum, step 0."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = init_variables(model, init_key, image_size)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=rng,
    )


def _all_finite(tree) -> jax.Array:
    """False when any leaf holds an inf or a nan.

    A leaf's sum is non-finite exactly when it holds one (or when finite entries
    overflow float32's 3e38, which is a blow-up too); summing with `channel_sum`
    reads each leaf once, where XLA:CPU's elementwise-check-and-reduce of every
    parameter-sized gradient costs a tree of slow reduce-windows.
    """
    sums = [layers.channel_sum(jnp.atleast_1d(x)) for x in jax.tree.leaves(tree)]
    return jnp.isfinite(jnp.sum(jnp.concatenate(sums)))


def make_train_step(
    model: PMG,
    tx: optax.GradientTransformation,
    *,
    granularities: tuple[int, ...] = (8, 4, 2),
    jigsaw_mode: str = "cycle",
    concat_weight: float = 2.0,
    permutations: dict[int, jax.Array] | None = None,
    bn_stats: str = "all",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One whole PMG iteration: a jigsaw pass per granularity and one pass on the originals.

    Pass k shuffles the batch into n_k x n_k blocks and trains head k; the last pass
    trains the concat head on the unshuffled images with weight `concat_weight`.
    Each pass runs the whole network in train mode (every BN updates its running
    statistics) and is followed by its own optimizer update. If any loss or gradient
    is non-finite the state is returned unchanged and metrics['nonfinite_pass'] names
    the first bad pass (1-based; 0 when all are finite). `permutations` fixes the
    jigsaw per granularity (tests); otherwise they are drawn from the state's RNG.
    bn_stats='used' keeps only the running statistics of the modules that feed the
    pass's head (trunk up to its stage, its block, its classifier; everything but
    classifiers 1-3 for concat): XLA then drops the forward of the rest as dead code.
    """
    if bn_stats not in ("all", "used"):
        raise ValueError(f"bn_stats must be 'all' or 'used', got {bn_stats!r}")

    def cross_entropy(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def feeds(head: int, path: tuple[str, ...]) -> bool:
        """Whether the module at `path` lies on the way to head `head` (3 = concat)."""
        top = path[0]
        if top == "features":
            stage = int(path[1][len("layer")]) if path[1].startswith("layer") else 0
            return head == 3 or stage <= head + 2
        if top.startswith("conv_block"):
            return head == 3 or top.startswith(f"conv_block{head + 1}_")
        return top.startswith(f"classifier{head + 1}_" if head < 3 else "classifier_concat_")

    def keep_used(head: int, new: Any, old: Any) -> Any:
        """`new` statistics where they feed `head`, `old` elsewhere."""
        return jax.tree_util.tree_map_with_path(
            lambda path, n, o: n if feeds(head, tuple(k.key for k in path)) else o, new, old)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images, labels = batch["image"], batch["label"]
        key = jax.random.fold_in(state.rng, state.step)
        params, stats, opt_state = state.params, state.batch_stats, state.opt_state
        passes = [(n, k, 1.0) for k, n in enumerate(granularities)] + [(None, 3, concat_weight)]
        metrics, bad_pass = {}, jnp.zeros((), jnp.int32)
        for i, (n, head, weight) in enumerate(passes):
            if n is None:
                x = images
            elif permutations is not None:
                x = jigsaw_lib.shuffle_blocks(images, n, permutations[n])
            else:
                x = jigsaw_lib.jigsaw(jax.random.fold_in(key, i), images, n, jigsaw_mode)

            def loss_fn(p, x=x, head=head, weight=weight):
                logits, updated = model.apply(
                    {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                new_stats = updated["batch_stats"]
                if bn_stats == "used":
                    new_stats = keep_used(head, new_stats, stats)
                return weight * cross_entropy(logits[head], labels), (new_stats, logits[head])

            (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            finite = jnp.isfinite(loss) & _all_finite(grads)
            bad_pass = jnp.where((bad_pass == 0) & ~finite, i + 1, bad_pass)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics[LOSS_NAMES[head]] = loss
        metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
        metrics["nonfinite_pass"] = bad_pass
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
        ok = bad_pass == 0
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return new_state, metrics

    return train_step


def make_eval_step(model: PMG) -> Callable[[TrainState, dict], jax.Array]:
    """Correct-prediction counts of head1..3, concat and combined (sum of the four logits), masked."""

    def eval_step(state: TrainState, batch: dict) -> jax.Array:
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
        preds = [*logits, sum(logits)]
        hits = [jnp.sum((jnp.argmax(p, -1) == batch["label"]) * batch["mask"]) for p in preds]
        return jnp.stack([*hits, jnp.sum(batch["mask"])])

    return eval_step


def compile_steps(model, tx, config, mesh):
    """jit the train and eval steps over the mesh: batch sharded on 'data', state replicated and donated."""
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    train_step = make_train_step(
        model, tx,
        granularities=tuple(config.jigsaw.granularities),
        jigsaw_mode=config.jigsaw.mode,
        concat_weight=config.concat_loss_weight,
        bn_stats=config.bn_stats,
    )
    spec = transform_spec(config)

    def on_model_inputs(step):
        """Normalise uint8 batches on the device (config.data.normalize_on_device); float ones pass."""
        return lambda state, batch: step(state, {**batch, "image": pipeline.normalize_on_device(batch["image"], spec)})

    platform = mesh.devices.flat[0].platform
    p_train = xla_options.jit(on_model_inputs(train_step), platform=platform, program="train",
                              in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
    p_eval = xla_options.jit(on_model_inputs(make_eval_step(model)), platform=platform,
                             in_shardings=(rep, data), out_shardings=rep)
    return p_train, p_eval


def evaluate(p_eval, state: TrainState, batches: Iterator[dict], sharding) -> dict[str, float]:
    """Accuracy (%) of every head, concat and combined over a whole split, each example counted once."""
    totals = np.zeros(len(HEAD_NAMES) + 1, np.float64)
    for batch in pipeline.prefetch_to_device(batches, sharding):
        totals += np.asarray(jax.device_get(p_eval(state, batch)), np.float64)
    count = totals[-1]
    result = {name: 100.0 * totals[i] / max(count, 1) for i, name in enumerate(HEAD_NAMES)}
    result["count"] = int(count)
    return result


def format_eval_table(epoch: int, result: dict[str, float]) -> str:
    """A small aligned table of per-head accuracies."""
    head = " | ".join(f"{n:>8}" for n in HEAD_NAMES)
    vals = " | ".join(f"{result[n]:8.2f}" for n in HEAD_NAMES)
    return f"eval epoch {epoch} on {result['count']} images (top-1 %)\n  {head}\n  {vals}"


class MetricsLog:
    """metrics.jsonl plus TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def transform_spec(config: ml_collections.ConfigDict) -> pipeline.TransformSpec:
    return pipeline.TransformSpec.from_config(config.data)


class Stop:
    """SIGTERM/SIGINT while training: finish the iteration, checkpoint, exit cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Stop":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._note)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _raise_if_nonfinite(step: int, metrics: dict, checkpoints: ckpt_lib.Checkpoints) -> None:
    bad = int(metrics["nonfinite_pass"])
    if bad:
        checkpoints.wait()
        raise FloatingPointError(
            f"non-finite loss or gradient at iteration {step} in the pass for {('head1', 'head2', 'head3', 'concat')[bad - 1]}"
            f"; the step was not applied, the latest checkpoint in {checkpoints.directory} is the last good one")


def initial_state(config, model, tx, checkpoints: ckpt_lib.Checkpoints, rep) -> tuple[TrainState, dict]:
    """Resume from the workdir, else start from init.checkpoint / init.backbone weights, else from scratch."""
    abstract = jax.eval_shape(lambda: create_state(model, tx, config.seed, config.data.crop_size))
    if checkpoints.latest_step() is not None:
        validate.check_compatible(checkpoints.config(), config, checkpoints.directory)
        state, meta = checkpoints.restore(abstract, sharding=rep)
        return state, meta
    state = create_state(model, tx, config.seed, config.data.crop_size)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if config.init.checkpoint:
        variables = load_variables(config.init.checkpoint, config)
    if config.init.backbone:
        from pmg_jax import convert

        variables = convert.load_backbone(config.init.backbone, variables)
        print(f"backbone initialised from {config.init.backbone}")
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=tx.init(variables["params"]))
    return jax.device_put(state, rep), {}


@flax.struct.dataclass
class Restored:
    """A checkpoint ready for inference: its model, weights, config and metadata."""

    run: str = flax.struct.field(pytree_node=False)
    step: int = flax.struct.field(pytree_node=False)
    model: PMG = flax.struct.field(pytree_node=False)
    variables: dict
    config: ml_collections.ConfigDict = flax.struct.field(pytree_node=False)
    meta: dict = flax.struct.field(pytree_node=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


def restore(path: str, which: str = "latest") -> Restored:
    """The checkpoint at `path`: a run, a folder of runs (the newest), or one checkpoint (see checkpoint.resolve)."""
    run, step = ckpt_lib.resolve(path, which)
    ckpts = ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True)
    state, meta = ckpts.restore(step=step)
    config = ckpts.config(step)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return Restored(run, step, create_model(config, len(meta["class_names"])), variables, config, meta)


def load_variables(path: str, config: ml_collections.ConfigDict) -> dict:
    """params and batch_stats of a run or checkpoint, refused unless its model is the configured one."""
    restored = restore(path)
    validate.check_compatible(restored.config, config, path)
    print(f"weights from {restored.run} at step {restored.step}")
    return restored.variables


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Accuracy of init.checkpoint (or the workdir's latest checkpoint) on the test split."""
    mesh = parallel.make_mesh()
    test_src = sources.make_source(config, "test")
    model = create_model(config, len(test_src.class_names))
    variables = load_variables(config.init.checkpoint or workdir, config)
    rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), opt_state=None, rng=jax.random.PRNGKey(0),
                                      **variables), rep)
    _, p_eval = compile_steps(model, None, config, mesh)
    n_eval, it = pipeline.eval_batches(test_src, transform_spec(config), pipeline.host_layout(config.eval_batch_size),
                                       workers=config.data.workers)
    result = evaluate(p_eval, state, it, data_sharding)
    print(format_eval_table(0, result).replace("eval epoch 0", f"eval of {config.init.checkpoint or workdir}"))
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train by the progressive schedule, evaluating and checkpointing every epoch; resumes from `workdir`.

    Returns the best evaluation ({'combined', 'concat', 'epoch', 'step'}), plus
    'stopped_by' when a signal ended the run early (after checkpointing it).
    """
    mesh = parallel.make_mesh()
    validate.check(config, mesh.devices.size, jax.process_count())
    if config.eval_only:
        return evaluate_only(config, workdir)
    from tqdm import tqdm

    # The train iterator's ring and an eval iterator's exist together; fail now, not after an epoch.
    spec, workers = transform_spec(config), config.data.workers
    slots.check_room(
        pipeline.shared_memory_bytes(spec, pipeline.host_layout(config.batch_size), workers, config.data.prefetch)
        + pipeline.shared_memory_bytes(spec, pipeline.host_layout(config.eval_batch_size), workers, EVAL_PREFETCH),
        f"the input pipeline's batch buffers for {workers} workers")
    os.makedirs(workdir, exist_ok=True)
    print(parallel.describe(mesh))
    train_src = sources.make_source(config, "train")
    test_src = sources.make_source(config, "test")
    class_names = list(train_src.class_names)
    steps_per_epoch = len(train_src) // config.batch_size
    if steps_per_epoch == 0:
        raise validate.ConfigError(f"config.batch_size={config.batch_size} is larger than the {len(train_src)} "
                                   f"training images")
    total_steps = steps_per_epoch * config.num_epochs

    model = create_model(config, len(class_names))
    tx = make_optimizer(
        lr_new=config.optim.lr_new, lr_backbone=config.optim.lr_backbone, num_epochs=config.num_epochs,
        steps_per_epoch=steps_per_epoch, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
    )
    rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    state, meta = initial_state(config, model, tx, checkpoints, rep)
    best = meta.get("best", {"combined": -1.0, "epoch": -1})
    start_step = int(state.step)
    if meta:
        print(f"resuming from {checkpoints.directory} at step {start_step} (epoch {start_step // steps_per_epoch})")
    p_train, p_eval = compile_steps(model, tx, config, mesh)

    _, batches = pipeline.train_batches(
        train_src, spec, pipeline.host_layout(config.batch_size), seed=config.seed, num_epochs=config.num_epochs,
        start_step=start_step, workers=config.data.workers, prefetch=config.data.prefetch,
    )
    device_batches = pipeline.prefetch_to_device(batches, data_sharding)
    metrics_log = MetricsLog(workdir)
    print(f"training {config.model.backbone} PMG on {config.dataset.name} ({len(train_src)} train / "
          f"{len(test_src)} test images, {len(class_names)} classes): {steps_per_epoch} steps x "
          f"{config.num_epochs} epochs, global batch {config.batch_size}")

    def save(step: int, result: dict | None = None) -> None:
        meta = {"epoch": step // steps_per_epoch, "step": step, "best": best, "class_names": class_names,
                "data_state": {"step": step, "seed": config.seed}, "eval": result}
        checkpoints.save(step, state, meta, config.to_dict(), metric=None if result is None else result["combined"])

    step = start_step
    with Stop() as stop:
        while step < total_steps and stop.signal is None:
            epoch = step // steps_per_epoch
            epoch_end = (epoch + 1) * steps_per_epoch
            progress = tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch,
                            desc=f"epoch {epoch + 1}/{config.num_epochs}", dynamic_ncols=True,
                            disable=jax.process_index() != 0)
            with progress as bar:  # closed before any error propagates, so the error is the last line
                sums, n, t0, first = {}, 0, time.perf_counter(), step
                pending = None  # the previous step's metrics, checked one step late so the device never waits
                while step < epoch_end and stop.signal is None:
                    state, metrics = p_train(state, next(device_batches))
                    step += 1
                    if pending is not None:
                        _raise_if_nonfinite(step - 1, pending, checkpoints)
                    pending = metrics
                    if step % config.log_every_steps == 0 or step == epoch_end:
                        m = jax.device_get(metrics)
                        _raise_if_nonfinite(step, m, checkpoints)
                        for k in (*LOSS_NAMES, "accuracy"):
                            sums[k] = sums.get(k, 0.0) + float(m[k])
                        n += 1
                        rate = (step - first) * config.batch_size / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix({**{k: f"{sums[k] / n:.3f}" for k in LOSS_NAMES},
                                         "acc": f"{100 * sums['accuracy'] / n:.1f}", "img/s": f"{rate:.1f}"})
                        metrics_log.write(step, "train", {k: float(m[k]) for k in (*LOSS_NAMES, "accuracy")})
                    if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step < epoch_end:
                        _raise_if_nonfinite(step, jax.device_get(metrics), checkpoints)  # never save after a bad step
                        save(step)
                    bar.update(1)
            _raise_if_nonfinite(step, jax.device_get(pending), checkpoints)
            if step < epoch_end:  # stopped by a signal mid-epoch
                break
            elapsed = time.perf_counter() - t0
            result = None
            if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
                n_eval, eval_it = pipeline.eval_batches(test_src, spec, pipeline.host_layout(config.eval_batch_size),
                                                        workers=config.data.workers, prefetch=EVAL_PREFETCH)
                result = evaluate(p_eval, state, eval_it, data_sharding)
                if result["combined"] >= best["combined"]:  # a tie goes to the later step, as in orbax
                    best = {"combined": result["combined"], "concat": result["concat"], "epoch": epoch + 1,
                            "step": step}
                print(format_eval_table(epoch + 1, result))
                metrics_log.write(step, "eval", result)
            metrics_log.write(step, "epoch", {"epoch": epoch + 1, "seconds": elapsed,
                                              "images_per_s": (step - first) * config.batch_size / max(elapsed, 1e-9),
                                              "unreadable_images": len(batches.unreadable.indices)})
            save(step, result)
        if stop.signal is not None:
            if checkpoints.latest_step() != step:
                save(step)
            checkpoints.wait()
            metrics_log.close()
            print(f"stopped by signal {stop.signal} at iteration {step}: checkpoint written to "
                  f"{checkpoints.directory}; run the same command again to resume")
            return {**best, "stopped_by": int(stop.signal)}
    checkpoints.wait()
    metrics_log.close()
    if best["epoch"] >= 0:
        print(f"best: combined {best['combined']:.2f}% (concat {best['concat']:.2f}%) at epoch {best['epoch']}; "
              f"checkpoints in {checkpoints.directory}")
    return best
