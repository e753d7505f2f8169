"""The training loop: train by the config's schedule, evaluate and checkpoint every epoch, resume exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from pmg_jax import cam_log, methods, optim, parallel, runguard, steps, validate
from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import state as state_lib
from pmg_jax.data import pipeline, positives, slots, sources
from pmg_jax.errors import PMGError
from pmg_jax.state import TrainState

EVAL_PREFETCH = 2  # batches each input worker buffers during evaluation


class NonFiniteError(PMGError, FloatingPointError):
    """A step's loss or gradient was inf or nan; the step was not applied."""


class RunIOError(PMGError, OSError):
    """The disk filled up (or failed) under the run; the checkpoints written before are intact."""


def trim_metrics(path: str, last_step: int) -> None:
    """Keep the rows of metrics.jsonl up to `last_step` (the checkpoint a run resumes from): a torn last line
    and the rows of an attempt that was cut short go, so no row is written twice. Replaced atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= last_step]
    if kept == lines:
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _row_step(line: str) -> int | None:
    """The step of one complete metrics.jsonl row; None for a torn or foreign line."""
    if not line.endswith("\n"):
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


class MetricsLog:
    """metrics.jsonl plus TensorBoard events in the workdir (process 0 only); accuracies in percent.

    Opened at the first write. A run resuming from the checkpoint at `start_step` first drops the rows after it
    (see trim_metrics), and TensorBoard purges its events after it, so each row and point is written once."""

    def __init__(self, workdir: str, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.workdir, self.start_step = workdir, start_step
        self.jsonl: Any = None
        self.tb: Any = None

    def _open(self) -> None:
        from tensorboardX import SummaryWriter

        path = os.path.join(self.workdir, "metrics.jsonl")
        trim_metrics(path, self.start_step)
        self.jsonl = open(path, "a")  # noqa: SIM115 (open for the run; close())
        self.tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), purge_step=self.start_step + 1)

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.tb.close()
            self.jsonl = self.tb = None


class FiniteGuard:
    """Checks each step's non-finite flag one step late, so the device never waits, and before any save."""

    def __init__(self, checkpoints: ckpt_lib.Checkpoints, schedule: str = "progressive"):
        self.checkpoints = checkpoints
        self.schedule = schedule
        self.pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> None:
        """Check the previous step, then hold this one's metrics."""
        self.check()
        self.pending = (step, metrics)

    def check(self) -> None:
        """Raise NonFiniteError if the held step was not applied (its parameters were kept)."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        bad = int(metrics["nonfinite_pass"])
        if bad:
            self.checkpoints.wait()
            raise NonFiniteError(
                f"non-finite loss or gradient at iteration {step} in the pass for "
                f"{steps.pass_name(bad, self.schedule)}; the step "
                f"was not applied, the latest checkpoint in {self.checkpoints.directory} is the last good one"
            )


def initial_variables(config: ml_collections.ConfigDict, fresh: Callable[[], dict]) -> dict:
    """Starting weights: init.checkpoint's, else the seed's (`fresh()`, drawn only then), with init.backbone's
    backbone over them. The files are read first: one that is refused costs no initialisation."""
    variables = fresh
    if config.init.checkpoint:
        variables = state_lib.load_variables(config.init.checkpoint, config, config.init.which)
    if config.init.backbone:
        from pmg_jax import convert

        variables = convert.load_backbone(config.init.backbone, variables)
        print(f"backbone initialised from {config.init.backbone}")
    return variables() if callable(variables) else variables


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Accuracy of init.checkpoint (or the workdir's checkpoint, init.which) on the test split."""
    mesh = parallel.make_mesh()
    test_src = sources.make_source(config, "test")
    model = state_lib.create_model(config, len(test_src.class_names))
    path = config.init.checkpoint or workdir
    variables = state_lib.load_variables(path, config, config.init.which)
    rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.device_put(
        TrainState(step=jnp.zeros((), jnp.int32), opt_state=None, rng=jax.random.PRNGKey(0), **variables), rep
    )
    _, eval_step = steps.compile_steps(model, None, config, mesh)
    _, it = pipeline.eval_batches(
        test_src,
        state_lib.transform_spec(config),
        pipeline.host_layout(config.eval_batch_size),
        workers=config.data.workers,
    )
    result = steps.evaluate(eval_step, state, it, data_sharding, methods.get(config.method).eval_names)
    print(steps.format_eval_table(f"eval of {path}", result))
    return result


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, interrupts: runguard.Interrupts | None = None
) -> dict[str, Any]:
    """Train by config.schedule, evaluating and checkpointing every epoch; resumes from `workdir`.

    Everything that can refuse the run (the config, the workdir, the data, the starting weights, a resume
    that changes what a step means, another training in the workdir) is checked before anything is written.
    The workdir is locked while training; SIGINT / SIGTERM are handled by `interrupts` (see runguard). A full
    disk ends the run with RunIOError. Returns the best evaluation ({'combined', 'concat', 'epoch', 'step'}),
    plus 'stopped_by' when a signal ended the run early (after checkpointing it).
    """
    with interrupts or runguard.Interrupts() as interrupts, contextlib.ExitStack() as held:
        try:
            return _train(config, workdir, interrupts, held)
        except Exception as e:
            failed = ckpt_lib.io_error(e)
            if failed is None:
                raise
            raise RunIOError(_io_message(failed, workdir)) from e


def _io_message(error: OSError, workdir: str) -> str:
    """One line: what failed where, which checkpoint it was writing, and which are intact."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    writing = ckpt_lib.unfinished_steps(ckpt_dir)
    what = f"checkpoint {writing[-1]}" if writing else os.path.basename(error.filename or "") or "the run's files"
    done = ckpt_lib.Checkpoints(ckpt_dir, read_only=True).latest_step() if ckpt_lib.has_checkpoint(ckpt_dir) else None
    intact = f"the checkpoints up to step {done} are intact" if done is not None else "no checkpoint was written"
    return f"{ckpt_lib.IO_ERRNOS[error.errno]} on {os.path.abspath(workdir)} while writing {what}; {intact}"


def open_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    abstract: TrainState,
    fresh: Any,
    rep: Any,
    train_images: int,
    interrupts: runguard.Interrupts,
    held: contextlib.ExitStack,
    locked: bool,
) -> tuple[TrainState, dict, ckpt_lib.Checkpoints]:
    """The run's state, meta and checkpoints, with the workdir locked (unless `locked` already; `held` releases
    it): resumed from the newest intact checkpoint, or `fresh()`'s state with the workdir made only now, after
    every refusal."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if ckpt_lib.has_checkpoint(ckpt_dir):
        locked = locked or _lock(workdir, held)
        state, meta = resume(config, workdir, abstract, rep, train_images)
        return state, meta, ckpt_lib.Checkpoints(ckpt_dir, keep=config.checkpoint.keep)
    state = fresh()
    with interrupts.creating(workdir):
        os.makedirs(workdir, exist_ok=True)  # the first write: every refusal has happened by now
        locked = locked or _lock(workdir, held)
        if ckpt_lib.has_checkpoint(ckpt_dir):
            raise PMGError(f"{workdir}: another training wrote checkpoints while this one started; run it again")
        checkpoints = ckpt_lib.Checkpoints(ckpt_dir, keep=config.checkpoint.keep)
    return state, {}, checkpoints


def _lock(workdir: str, held: contextlib.ExitStack) -> bool:
    """Lock the workdir for this training (process 0 speaks for the run), released when `held` closes."""
    if jax.process_index() == 0:
        held.callback(runguard.RunLock(workdir).release)
    return True


def resume(
    config: ml_collections.ConfigDict, workdir: str, abstract: TrainState, sharding: Any, train_images: int
) -> tuple[TrainState, dict]:
    """State and meta of the workdir's newest intact checkpoint, refused if the config does not fit it; the
    damaged checkpoints after it are moved aside (each said in one line)."""
    reader = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)

    def read(step: int) -> tuple[ml_collections.ConfigDict, TrainState, dict]:
        saved = reader.config(step)  # checked first: a changed structure is refused, not called damage
        validate.check_compatible(saved, config, reader.step_dir(step))
        validate.check_resume(saved, config, None, train_images, workdir)
        return saved, *reader.restore(abstract, step=step, sharding=sharding)

    step, (saved, state, meta) = reader.intact(reader.newest_first(), read)
    validate.check_resume(saved, config, meta.get("data_state", {}).get("train_images"), train_images, workdir)
    set_aside_damaged(reader, step, workdir)
    return state, meta


def set_aside_damaged(reader: ckpt_lib.Checkpoints, step: int, workdir: str) -> None:
    """Move the checkpoints after `step` (the newest intact one) to <workdir>/damaged_checkpoints/, so that the
    run writes those steps afresh and the damaged files stay for inspection."""
    if jax.process_index() != 0:
        return
    for later in sorted(s for s in reader.manager.all_steps() if s > step):
        dest = os.path.join(workdir, "damaged_checkpoints", str(later))
        while os.path.exists(dest):
            dest += "_"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(reader.step_dir(later), dest)
        print(f"moved damaged checkpoint {reader.step_dir(later)} to {dest}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains and evaluates: its data, model, optimizer and step counts, fixed before anything is written."""

    config: ml_collections.ConfigDict
    mesh: Any
    train_src: Any
    eval_srcs: dict[str, Any]  # with a validation split, 'best' is ranked on it and test is what it reports
    model: Any
    tx: Any
    steps_per_epoch: int
    pairing: positives.Pairing | None  # the positive pairs of a method that trains on them (PMG-V2)

    @property
    def method(self) -> methods.Method:
        """The method the run trains (config.method)."""
        return methods.get(self.config.method)

    @property
    def ranked_on(self) -> str:
        """The split the best checkpoint is chosen on: val when there is one, else test."""
        return next(iter(self.eval_srcs))

    @property
    def total_steps(self) -> int:
        """The iterations of the whole run."""
        return self.steps_per_epoch * self.config.num_epochs

    def eval_due(self, epoch: int) -> bool:
        """Whether the 1-based `epoch` ends with an evaluation (every eval_every_epochs-th, and the last)."""
        return epoch % self.config.eval_every_epochs == 0 or epoch == self.config.num_epochs


def plan_run(config: ml_collections.ConfigDict, mesh: Any) -> Plan:
    """The run's data, model and optimizer; refuses input buffers without room and a batch larger than the data."""
    spec, workers, method = state_lib.transform_spec(config), config.data.workers, methods.get(config.method)
    # The train iterator's ring and an eval iterator's exist together; fail now, not after an epoch.
    slots.check_room(
        pipeline.shared_memory_bytes(
            spec, pipeline.host_layout(config.batch_size), workers, config.data.prefetch, method.pairs
        )
        + pipeline.shared_memory_bytes(spec, pipeline.host_layout(config.eval_batch_size), workers, EVAL_PREFETCH),
        f"the input pipeline's batch buffers for {workers} workers",
    )
    train_src = sources.make_source(config, "train")
    pairing = positives.Pairing.of(train_src) if method.pairs else None  # refuses a class of one image
    eval_srcs = {"test": sources.make_source(config, "test")}
    if config.dataset.val_fraction:
        eval_srcs = {"val": sources.make_source(config, "val"), **eval_srcs}
    steps_per_epoch = len(train_src) // config.batch_size
    if steps_per_epoch == 0:
        raise validate.ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {len(train_src)} training images"
        )
    model = state_lib.create_model(config, len(train_src.class_names))
    tx = optim.from_config(config, steps_per_epoch)
    return Plan(config, mesh, train_src, eval_srcs, model, tx, steps_per_epoch, pairing)


def fresh_state(plan: Plan) -> TrainState:
    """A new run's state: the seed's weights under the starting weights of init.*, a new optimizer state."""
    config = plan.config
    starting = functools.partial(initial_variables, config)
    state = state_lib.create_state(plan.model, plan.tx, config.seed, config.data.crop_size, starting)
    return jax.device_put(state, parallel.replicated(plan.mesh))


def restore_or_initialise(
    plan: Plan, workdir: str, interrupts: runguard.Interrupts, held: contextlib.ExitStack, locked: bool
) -> tuple[TrainState, dict, ckpt_lib.Checkpoints]:
    """The run's state, meta and checkpoints: resumed from the workdir's newest intact checkpoint, or fresh."""
    config = plan.config
    abstract = jax.eval_shape(lambda: state_lib.create_state(plan.model, plan.tx, config.seed, config.data.crop_size))
    rep, fresh = parallel.replicated(plan.mesh), functools.partial(fresh_state, plan)
    opened = open_run(config, workdir, abstract, fresh, rep, len(plan.train_src), interrupts, held, locked)
    state, meta, checkpoints = opened
    if meta:
        step = int(state.step)
        print(f"resuming from {checkpoints.directory} at step {step} (epoch {step // plan.steps_per_epoch})")
    return opened


def announce(plan: Plan) -> None:
    """Print the devices and what is trained on what, for how long."""
    config = plan.config
    print(parallel.describe(plan.mesh))
    sizes = " / ".join(f"{len(s)} {n}" for n, s in {"train": plan.train_src, **plan.eval_srcs}.items())
    print(
        f"training {config.model.backbone} {plan.method.title} on {config.dataset.name} ({sizes} images, "
        f"{len(plan.train_src.class_names)} classes): {plan.steps_per_epoch} steps x {config.num_epochs} epochs, "
        f"global batch {config.batch_size}"
        + ("; the best checkpoint is chosen on val" if plan.ranked_on == "val" else "")
    )


class Run:
    """A run in progress: its state, step and best evaluation, and where they go (checkpoints, metrics, CAMs)."""

    def __init__(
        self,
        plan: Plan,
        workdir: str,
        opened: tuple[TrainState, dict, ckpt_lib.Checkpoints],
        interrupts: runguard.Interrupts,
        held: contextlib.ExitStack,
    ):
        config, self.plan, self.interrupts = plan.config, plan, interrupts
        self.state, meta, self.checkpoints = opened
        self.best = meta.get("best", {"combined": -1.0, "epoch": -1})
        self.step = int(self.state.step)
        self.compiled_at: tuple[int, float] | None = None  # (step, time) once the step function has been compiled
        self.epoch_start, self.sums, self.logged = (self.step, 0.0), {}, 0  # this epoch's, for the train lines
        _, self.batches = pipeline.train_batches(
            plan.train_src,
            state_lib.transform_spec(config),
            pipeline.host_layout(config.batch_size),
            seed=config.seed,
            num_epochs=config.num_epochs,
            start_step=self.step,
            workers=config.data.workers,
            prefetch=config.data.prefetch,
            pairing=plan.pairing,
        )
        self.device_batches = pipeline.prefetch_to_device(self.batches, parallel.batch_sharding(plan.mesh))
        self.metrics_log = MetricsLog(workdir, self.step)
        self.guard = FiniteGuard(self.checkpoints, config.schedule)
        held.callback(self.metrics_log.close)  # also when the run fails
        rep = parallel.replicated(plan.mesh)
        self.cams = cam_log.for_config(config, plan.model, plan.eval_srcs["test"], workdir, rep)  # None unless log_cams

    def save(self, step: int, results: dict | None = None) -> None:
        """Checkpoint the state at `step` with its meta (and the evaluation `results` it is ranked by, if any)."""
        self.guard.check()  # never save after a bad step
        config = self.plan.config
        meta = {
            "epoch": step // self.plan.steps_per_epoch,
            "step": step,
            "best": self.best,
            "class_names": list(self.plan.train_src.class_names),
            "data_state": {"step": step, "seed": config.seed, "train_images": len(self.plan.train_src)},
            "eval": results,
        }
        metric = None if results is None else results[self.plan.ranked_on]["combined"]
        self.checkpoints.save(step, self.state, meta, config.to_dict(), metric=metric)

    def train_epoch(self, train_step: Callable, stop: runguard.Interrupts) -> dict | None:
        """Train to the end of the current epoch (or a signal), checkpointing every checkpoint.every_steps; the
        epoch's record, or None when a signal stopped it mid-epoch."""
        config, steps_per_epoch = self.plan.config, self.plan.steps_per_epoch
        epoch = self.step // steps_per_epoch
        epoch_end, totals = (epoch + 1) * steps_per_epoch, None
        self.epoch_start, self.sums, self.logged = (self.step, time.perf_counter()), {}, 0
        bar = tqdm.tqdm(
            total=steps_per_epoch,
            initial=self.step - epoch * steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.num_epochs}",
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
        )
        with bar:  # closed before any error propagates, so the error is the last line
            while self.step < epoch_end and stop.signal is None:
                totals = self.iteration(train_step, totals, bar, epoch_end)
        self.guard.check()
        if self.step < epoch_end:  # stopped by a signal mid-epoch
            return None
        return {
            "epoch": epoch + 1,
            "seconds": time.perf_counter() - self.epoch_start[1],
            "images_per_s": _rate(self.epoch_start, self.compiled_at, self.step, config.batch_size),
            "unreadable_images": len(self.batches.unreadable.indices),
            **_mean_metrics(totals, self.step - self.epoch_start[0]),
        }

    def iteration(self, train_step: Callable, totals: dict | None, bar: Any, epoch_end: int) -> dict:
        """One training step: logged every log_every_steps (and at the epoch's end); the running metric sums."""
        config = self.plan.config
        self.state, metrics = train_step(self.state, next(self.device_batches))
        self.step += 1
        if self.compiled_at is None:  # the first call compiled: from now on a signal stops after an iteration
            self.interrupts.training()
        self.compiled_at = self.compiled_at or (self.step, time.perf_counter())
        self.guard.push(self.step, metrics)
        totals = _add_metrics(totals, metrics)
        if self.step % config.log_every_steps == 0 or self.step == epoch_end:
            self.log_train(metrics, bar)
        if config.checkpoint.every_steps and self.step % config.checkpoint.every_steps == 0 and self.step < epoch_end:
            self.save(self.step)
        bar.update(1)
        return totals

    def log_train(self, metrics: dict, bar: Any) -> None:
        """Write one step's train metrics (after checking it was finite) and show the epoch's means on the bar."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite_pass"}
        self.guard.check()
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in m.items()}
        self.logged += 1
        rate = _rate(self.epoch_start, self.compiled_at, self.step, self.plan.config.batch_size)
        bar.set_postfix(
            {
                **{k: f"{self.sums[k] / self.logged:.3f}" for k in steps.LOSS_NAMES if k in self.sums},
                "acc": f"{self.sums['accuracy'] / self.logged:.1f}",
                "img/s": f"{rate:.1f}",
            }
        )
        self.metrics_log.write(self.step, "train", m)

    def evaluate(self, eval_step: Callable, record: dict) -> dict[str, dict]:
        """Evaluate every split, log the CAMs (timings into `record`) and keep the best; the results by split."""
        config, epoch = self.plan.config, record["epoch"]
        spec, layout = state_lib.transform_spec(config), pipeline.host_layout(config.eval_batch_size)
        results, eval_start = {}, time.perf_counter()
        for name, src in self.plan.eval_srcs.items():
            _, eval_it = pipeline.eval_batches(src, spec, layout, workers=config.data.workers, prefetch=EVAL_PREFETCH)
            results[name] = steps.evaluate(
                eval_step, self.state, eval_it, parallel.batch_sharding(self.plan.mesh), self.plan.method.eval_names
            )
            print(steps.format_eval_table(f"eval epoch {epoch}, {name}", results[name]))
            self.metrics_log.write(self.step, "eval", {"split": name, **results[name]})
        record["eval_seconds"] = time.perf_counter() - eval_start
        record.update(_log_cams(self.cams, epoch, self.state, self.metrics_log, self.step))
        ranked_on = self.plan.ranked_on
        if results[ranked_on]["combined"] >= self.best["combined"]:  # a tie goes to the later step, as in orbax
            self.best = _best(results, ranked_on, epoch, self.step)
        return results

    def end_epoch(self, record: dict, results: dict | None) -> None:
        """Write the epoch's record and its checkpoint."""
        self.metrics_log.write(self.step, "epoch", record)
        self.save(self.step, results)

    def outcome(self, signal: int | None) -> dict[str, Any]:
        """Wait for the checkpoints, say how the run ended; the best evaluation (and 'stopped_by' a signal)."""
        self.checkpoints.wait()
        self.metrics_log.close()
        best, where = self.best, self.checkpoints.directory
        if signal is not None:
            print(
                f"stopped by signal {signal} at iteration {self.step}: checkpoint written to {where}; "
                "run the same command again to resume"
            )
            return {**best, "stopped_by": int(signal)}
        if best["epoch"] >= 0 and self.plan.ranked_on == "val":
            print(
                f"best on val: combined {best['combined']:.2f}% at epoch {best['epoch']}; its test accuracy: combined "
                f"{best['test_combined']:.2f}%{_concat(best['test_concat'])}; checkpoints in {where}"
            )
        elif best["epoch"] >= 0:
            print(
                f"best: combined {best['combined']:.2f}%{_concat(best['concat'])} at epoch {best['epoch']}; "
                f"checkpoints in {where}"
            )
        return best


def _train(
    config: ml_collections.ConfigDict, workdir: str, interrupts: runguard.Interrupts, held: contextlib.ExitStack
) -> dict[str, Any]:
    """train_and_evaluate's work, with the signals handled and the lock released by the caller."""
    mesh = parallel.make_mesh()
    validate.check(config, mesh.devices.size, jax.process_count())
    validate.check_workdir(workdir)
    if config.eval_only:
        return evaluate_only(config, workdir)
    # a busy workdir is refused before any work (a workdir without a lock file has no training to wait for)
    locked = os.path.exists(os.path.join(workdir, runguard.LOCK_NAME)) and _lock(workdir, held)
    plan = plan_run(config, mesh)
    opened = restore_or_initialise(plan, workdir, interrupts, held, locked)
    train_step, eval_step = steps.compile_steps(plan.model, plan.tx, config, mesh)
    announce(plan)
    run = Run(plan, workdir, opened, interrupts, held)
    with interrupts as stop:
        while run.step < plan.total_steps and stop.signal is None:
            record = run.train_epoch(train_step, stop)
            if record is None:  # a signal stopped the epoch
                break
            results = run.evaluate(eval_step, record) if plan.eval_due(record["epoch"]) else None
            run.end_epoch(record, results)
        if stop.signal is not None and run.checkpoints.latest_step() != run.step:
            run.save(run.step)
    return run.outcome(stop.signal)


def _concat(accuracy: float | None) -> str:
    """' (concat X%)' after a combined accuracy, for a method with a concat head; '' otherwise."""
    return "" if accuracy is None else f" (concat {accuracy:.2f}%)"


def _best(results: dict[str, dict], ranked_on: str, epoch: int, step: int) -> dict:
    """The best-so-far record: the ranking split's combined and concat accuracy, and with a validation split
    also the test accuracy of this same checkpoint (the honest figure: not the best test accuracy over epochs)."""
    best = {
        "combined": results[ranked_on]["combined"],
        "concat": results[ranked_on].get("concat"),  # PMG's concat head (PMG-V2 has none)
        "epoch": epoch,
        "step": step,
        "split": ranked_on,
    }
    if ranked_on != "test":
        best.update(test_combined=results["test"]["combined"], test_concat=results["test"].get("concat"))
    return best


def _log_cams(cams: cam_log.CamLog | None, epoch: int, state: TrainState, log: MetricsLog, step: int) -> dict:
    """After an evaluation, the CAMs of the run's fixed test images (config.log_cams) to TensorBoard and cams/;
    the seconds they took, for the epoch record ({} when off)."""
    if cams is None:
        return {}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return {"cams_seconds": cams(epoch, variables, log.tb if log.enabled else None, step)}


def _add_metrics(totals: dict | None, metrics: dict) -> dict:
    """Running sums of every step's losses and train accuracy, kept on the device (no wait for the step)."""
    metrics = {k: v for k, v in metrics.items() if k != "nonfinite_pass"}
    return metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)


def _mean_metrics(totals: dict | None, count: int) -> dict[str, float]:
    """The epoch record's mean of each loss and of the train accuracy over its `count` steps in this process
    (every step, where the logged train lines sample every log_every_steps-th); {} before any step."""
    if totals is None or count <= 0:
        return {}
    return {"train_steps": count, **{k: float(v) / count for k, v in jax.device_get(totals).items()}}


def _rate(epoch_start: tuple[int, float], compiled_at: tuple[int, float], step: int, batch_size: int) -> float:
    """This epoch's images/s up to now at `step`, from (step, time) `epoch_start`, or from the end of the step
    that compiled when that was in this epoch (compilation is not throughput); 0 until a step has counted."""
    since = compiled_at if compiled_at[0] > epoch_start[0] else epoch_start
    done, seconds = step - since[0], time.perf_counter() - since[1]
    return done * batch_size / seconds if done > 0 and seconds > 0 else 0.0
