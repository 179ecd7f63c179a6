"""The training engine, read top to bottom: set up, data, program, restore, then the loop of step, log, evaluate,
checkpoint, preemption. Written once; what is trained is a task plugged into it.

A task (``cratemae.train.pretrain.Pretrain``, ``cratemae.train.finetune.Finetune``) is built from
``(config, data_info)`` and provides:

  model, train_keys, eval_keys    the Flax module; the batch entries its train and eval steps read
  eval_sums, eval_whole_split     the eval outputs summed over batches; evaluate the whole split or
                                  config.train.eval_batches batches of it
  init(tx, images)                the initial TrainState (pure; jitted with the state shardings)
  warm_start(state, tx, shardings) the state a fresh run starts from (fine-tuning loads the pretrained encoder)
  train_step(tx, schedule)        -> step(state, batch) -> (state, metrics)   (pure)
  eval_step(params, batch, key)   -> dict of per-batch sums and outputs       (pure)
  eval_scalars(sums)              -> {'eval/...': value}
  pictures(...)                   images and extra scalars of the first eval batch
  train_flops_per_image()         for MFU, or None
  train_batch_shapes(batch)       ShapeDtypeStructs of a train batch (ahead-of-time compilation); images uint8

The steps receive uint8 images and the engine normalises them on the devices first (``normalizing``), so the
tasks' steps see float32 normalised images.

Everything else (mesh, state shardings, restore of the newest good checkpoint, async Orbax saves, exact resume,
SIGTERM / multi-host preemption, the NaN guard, metrics, throughput, the progress line and a jax.profiler trace of
chosen steps, ``train.profile_start``) is the engine's, so both
tasks get all of it. ``STEP_HOOKS`` lets tests inject faults after a step without a library argument.
"""

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cratemae import checkpoint
from cratemae import data
from cratemae import distributed
from cratemae import flops
from cratemae import metrics as metrics_lib
from cratemae import models
from cratemae import sharding
from cratemae.data import device
from cratemae.data import splits as split_lib
from cratemae.train import optimizer
from cratemae.train import step as step_lib

log = logging.getLogger(__name__)

# Called as hook(step, checkpointer) after every step's checkpoint decision; tests append fault injectors here.
STEP_HOOKS: list[Callable[[int, checkpoint.Checkpointer], None]] = []


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint was left untouched."""


def validate_config(config, num_devices_for_batch: int, process_count: int) -> None:
    """Every check that can fail before compiling: model, data, and how the batch splits over devices."""
    models.validate_model_config(config.model)
    data.validate_data_config(config.data)
    m, d = config.model, config.data
    if (d.image_size, d.channels) != (m.image_size, m.channels):
        raise ValueError(
            f'data gives {d.image_size}px images with {d.channels} channel(s) but the model expects '
            f'{m.image_size}px with {m.channels}; set --config.data.image_size/channels or '
            '--config.model.image_size/channels to agree.'
        )
    batch, accum = config.train.global_batch, config.optim.accum_steps
    if batch < 1 or accum < 1 or batch % accum:
        raise ValueError(f'train.global_batch={batch} must be a positive multiple of optim.accum_steps={accum}.')
    if (batch // accum) % num_devices_for_batch:
        raise ValueError(
            f'Each microbatch of {batch // accum} images (global_batch={batch} / accum_steps={accum}) '
            f'must split evenly over the {num_devices_for_batch} devices of the data axes; choose a '
            f'global batch that is a multiple of {num_devices_for_batch * accum}.'
        )
    if batch % process_count:
        raise ValueError(f'train.global_batch={batch} must divide over the {process_count} processes.')
    if config.train.eval_batch % num_devices_for_batch:
        raise ValueError(
            f'train.eval_batch={config.train.eval_batch} must split evenly over the {num_devices_for_batch} '
            f'devices of the data axes; choose a multiple of {num_devices_for_batch}.'
        )
    if config.train.steps < 1:
        raise ValueError(f'train.steps={config.train.steps} must be at least 1.')
    validate_profile(config.train)
    if config.optim.get('schedule_steps') is not None and config.optim.schedule_steps < 1:
        raise ValueError(
            f'optim.schedule_steps={config.optim.schedule_steps} must be at least 1, or None to follow train.steps.'
        )


def validate_profile(train_config) -> None:
    """train.profile_start / profile_steps: a window of whole steps inside the run (or no window)."""
    start, count = train_config.get('profile_start'), train_config.get('profile_steps', 3)
    if start is None:
        return
    if start < 0 or count < 1 or start + count > train_config.steps:
        raise ValueError(
            f'train.profile_start={start} with train.profile_steps={count} traces steps {start}..{start + count - 1}, '
            f'which must lie inside the run\'s steps 0..{train_config.steps - 1}; choose a start >= 0 (1 or later '
            'keeps compiling out of the trace) and at least one step, or profile_start=None for no trace.'
        )


class StepProfiler:
    """A jax.profiler trace of steps [start, start + count) into <workdir>/profile, with each traced step marked
    (StepTraceAnnotation) so TensorBoard's profile plugin shows per-step times; Perfetto reads the
    perfetto_trace.json.gz written beside the TensorBoard files. A resumed run past the window traces nothing."""

    DIR = 'profile'

    def __init__(self, train_config, workdir: str):
        self.start, self.count = train_config.get('profile_start'), train_config.get('profile_steps', 3)
        self.directory = os.path.join(workdir, self.DIR)
        self.active = False

    def step(self, step: int):
        """The context to run step ``step`` in: starts the trace at the window's first step, marks traced steps."""
        if self.start is not None and step == self.start and not self.active:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True
            log.info('Profiling steps %d..%d into %s', self.start, self.start + self.count - 1, self.directory)
        if self.active:
            return jax.profiler.StepTraceAnnotation('train', step_num=step)
        return contextlib.nullcontext()

    def after(self, step: int, outputs):
        """Stops the trace once the window's last step has finished on the devices (``outputs`` waited on)."""
        if self.active and step + 1 >= self.start + self.count:
            self.stop(outputs)

    def stop(self, outputs=None):
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False


def settle_config(config, mesh, process_count: int) -> dict:
    """Before compiling for ``mesh``: every check of ``validate_config`` for its data axes, then the platform's choices
    for the options the config leaves unset (``models.apply_platform_defaults``, the mesh's platform). Returns them."""
    validate_config(config, mesh.shape['data'] * mesh.shape['fsdp'], process_count)
    return models.apply_platform_defaults(config.model, mesh.devices.flat[0].platform)


@dataclasses.dataclass(frozen=True)
class Program:
    """What the engine runs on a mesh; launch.aot_compile and launch.benchmark lower the same train_step."""

    task: Any
    tx: Any
    init_fn: Callable  # images (1, H, W, C) -> TrainState; jit it with out_shardings=state_shardings
    image_shape: tuple
    state_shardings: step_lib.TrainState
    abstract_state: step_lib.TrainState  # ShapeDtypeStructs carrying state_shardings (restore / AOT targets)
    train_step: Callable  # jitted, the state donated
    eval_step: Callable

    def init(self) -> step_lib.TrainState:
        """The task's initial state, created where it lives (before any warm start)."""
        return jax.jit(self.init_fn, out_shardings=self.state_shardings)(jnp.zeros(self.image_shape, jnp.float32))


def normalizing(step_fn, mean, std):
    """step_fn(first, batch, *rest) fed the batch with its uint8 images normalised on the devices: the host hands
    uint8 batches over (a quarter of the bytes of float32) and the cast and (x / 255 - mean) / std run in the step."""

    def step(first, batch, *rest):
        return step_fn(first, {**batch, 'image': device.normalize(batch['image'], mean, std)}, *rest)

    return step


def build_program(config, mesh, task) -> Program:
    """Optimizer; shapes first (eval_shape), then shardings from the config's regex rules; the jitted steps with
    explicit shardings and the train state donated so parameters are updated in place."""
    batch, steps = config.train.global_batch, optimizer.schedule_length(config)
    schedule = optimizer.learning_rate_schedule(config.optim, batch, steps)
    tx = optimizer.make_optimizer(config.optim, batch, steps)
    image_shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
    init_fn = functools.partial(task.init, tx)
    abstract_state = jax.eval_shape(init_fn, jax.ShapeDtypeStruct(image_shape, jnp.float32))
    replicated = sharding.replicated(mesh)
    state_shardings = step_lib.TrainState(
        step=replicated,
        params=sharding.param_shardings(abstract_state.params, config.sharding_rules, mesh),
        opt_state=sharding.param_shardings(abstract_state.opt_state, config.sharding_rules, mesh),
        rng=replicated,
        nonfinite_step=replicated,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    mean, std = data.normalization(config.data)
    train_step = jax.jit(
        normalizing(task.train_step(tx, schedule), mean, std),
        in_shardings=(state_shardings, {k: batch_sharding for k in task.train_keys}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        normalizing(task.eval_step, mean, std),
        in_shardings=(state_shardings.params, {k: batch_sharding for k in task.eval_keys}, replicated),
    )
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings
    )
    return Program(task, tx, init_fn, image_shape, state_shardings, abstract_sharded, train_step, eval_step)


def run(config, workdir: str, make_task, *, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) ``make_task(config, data_info)`` on ``config`` into ``workdir``; returns the last metrics."""
    # ----------------------------------------------------------------------------------------------------------
    # Set up. Everything that can be wrong with the config or the workdir fails here, before any compile.
    distributed.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    chosen = settle_config(config, mesh, jax.process_count())
    if chosen:
        log.info(
            'Options chosen for %s: %s (set them in the config to override)', mesh.devices.flat[0].platform, chosen
        )
    checkpoint.ensure_writable(workdir)
    checkpoint.check_compatible(workdir, config, allow_change=allow_config_change)
    log.info(
        'Devices: %d x %s on %d process(es); mesh %s',
        jax.device_count(),
        jax.devices()[0].device_kind,
        jax.process_count(),
        dict(mesh.shape),
    )

    # ----------------------------------------------------------------------------------------------------------
    # Input pipeline: the batch at step s is a pure function of (seed, s, host), so the data position is the step.
    pipeline = functools.partial(
        data.make_pipeline,
        config.data,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        uint8=True,
        dataset=data.resolve(config.data),  # once, for both pipelines
    )
    train_data = pipeline(split=config.data.split_train, global_batch=config.train.global_batch, train=True)
    eval_data = pipeline(split=config.data.split_eval, global_batch=config.train.eval_batch, train=False)
    held_out = split_lib.disjoint(train_data.split, eval_data.split)
    eval_on = f'{config.data.name}[{eval_data.split}]' + ('' if held_out else ' (the training images)')
    if not held_out:
        log.warning('Evaluating on %s: no held-out split (set --config.data.split_eval).', eval_on)

    # ----------------------------------------------------------------------------------------------------------
    # The task, optimizer, state shardings and the jitted steps (shared with launch.aot_compile / benchmark).
    task = make_task(config, train_data.info)
    checkpoint.save_config(workdir, config)
    program = build_program(config, mesh, task)
    train_step, eval_step, total_steps = program.train_step, program.eval_step, config.train.steps

    # ----------------------------------------------------------------------------------------------------------
    # Restore the newest good checkpoint, if any (a corrupt newest one is reported and skipped); else start fresh.
    ckpt = checkpoint.Checkpointer.from_config(workdir, config.checkpoint)
    restored = ckpt.restore_latest(program.abstract_state)
    if restored is None:
        state = task.warm_start(program.init(), program.tx, program.state_shardings)
        start_step, core_hours = 0, 0.0
        count = sum(x.size for x in jax.tree.leaves(program.abstract_state.params))
        log.info('Starting from scratch: %s parameters.', f'{count:,}')
    else:
        start_step, state, meta = restored
        core_hours = float(meta.get('core_hours', 0.0))
        log.info('Resumed from step %d.', start_step)

    writer = metrics_lib.MetricWriter(workdir, total_steps, start_step=start_step)
    throughput = metrics_lib.Throughput(
        config.train.global_batch, jax.device_count(), start_step=start_step, core_hours=core_hours
    )
    train_flops = task.train_flops_per_image()
    train_flops = None if train_flops is None else train_flops * config.train.global_batch
    device_kind = jax.devices()[0].device_kind

    def evaluate(step):
        """The task's eval sums over the held-out batches (the same masks or crops at every evaluation, so the curve
        is comparable); pictures and extra scalars of the first batch."""
        sums, extra = dict.fromkeys(task.eval_sums, 0.0), {}
        key = jax.random.key(config.seed + 1)
        count = None if task.eval_whole_split else config.train.eval_batches
        for i, (local, batch) in enumerate(device.eval_batches(eval_data, mesh, count)):
            batch = {k: batch[k] for k in task.eval_keys}
            out = eval_step(state.params, batch, jax.random.fold_in(key, i))
            sums = {k: v + float(out[k]) for k, v in sums.items()}
            if i == 0:
                extra = task.pictures(step, state.params, local, batch, out, eval_data.info, writer, workdir)
        scalars = {**task.eval_scalars(sums), 'eval/held_out': float(held_out)}  # 0: measured on training images
        writer.write_scalars(step, {**extra, **scalars})
        log.info(
            'step %d: eval on %s: %s',
            step,
            eval_on,
            ', '.join(f'{k.removeprefix("eval/").replace("_", " ")} {v:.4f}' for k, v in scalars.items()),
        )
        return scalars

    def save(step, force=False):
        if int(state.nonfinite_step) >= 0:
            raise NonFiniteLossError(
                f'The loss or gradient became NaN/inf at step {int(state.nonfinite_step)}; stopping without saving, so '
                f'the newest checkpoint in {ckpt.directory} is the last good state. Lower optim.base_lr or set '
                'optim.grad_clip, then rerun the same command to resume from it.'
            )
        meta = {
            'data_step': step,
            'seed': config.seed,
            'core_hours': throughput.core_hours,
            'config_hash': checkpoint.config_hash(config),
        }
        return ckpt.save(step, state, meta, force=force)

    # ----------------------------------------------------------------------------------------------------------
    # The loop: plain Python around the jitted step. The host reads device values at log steps only.
    ckpt.install_preemption_handler()
    profiler = StepProfiler(config.train, workdir)
    last = {}
    try:
        with train_data.iterate(start_step) as batches:
            # Two batches in flight on the devices: the copy of the next overlaps the running step. Batches stop at
            # the last step, so none is copied to the devices that no step will read.
            batches = ((s, {k: b[k] for k in task.train_keys}) for s, b in batches)
            batches = itertools.takewhile(lambda item: item[0] < total_steps, batches)
            for step, batch in device.prefetch(batches, mesh, size=2):
                with profiler.step(step):
                    state, step_metrics = train_step(state, batch)
                profiler.after(step, (state, step_metrics))
                done = step + 1
                log_step = done % config.train.log_every == 0 or done == total_steps
                if log_step:
                    last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    if int(state.nonfinite_step) >= 0:
                        save(done)  # raises NonFiniteLossError naming the step
                    last.update(throughput.measure(done))
                    if train_flops is not None:
                        last['mfu'] = flops.mfu(
                            train_flops, last.get('step_time_s', 0.0), device_kind, jax.device_count()
                        )
                    writer.write_scalars(done, {k: v for k, v in last.items() if v is not None})
                writer.update(done, **({'loss': last['loss']} if 'loss' in last else {}))
                if done % config.train.eval_every == 0 or done == total_steps:
                    with throughput.exclude():
                        last.update(evaluate(done))
                if done % config.checkpoint.every == 0 or done == total_steps:  # the last step is always saved
                    with throughput.exclude():
                        save(done, force=True)
                for hook in STEP_HOOKS:
                    hook(done, ckpt)
                # On several hosts the check is a small blocking collective: make it at log steps only.
                check_preemption = jax.process_count() == 1 or log_step
                if done < total_steps and check_preemption and ckpt.reached_preemption(done):
                    log.warning('Preemption: saving step %d and exiting; rerun the same command to resume.', done)
                    save(done, force=True)
                    break
        if start_step >= total_steps:
            log.info('Nothing to do: the workdir already holds the final step %d; evaluating it.', start_step)
            last.update(evaluate(start_step))
        ckpt.wait_until_finished()
    finally:
        profiler.stop()
        ckpt.uninstall_preemption_handler()
        ckpt.close()
        writer.close()
    last['step'] = min(int(state.step), total_steps)
    return last
