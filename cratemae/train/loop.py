"""Masked-completion pretraining, read top to bottom: set up, mesh, data, model, shard, restore, step, loop.

``train_and_evaluate(config, workdir)`` is what ``python -m launch.train`` runs. It trains on whatever devices JAX
sees (one CPU, a GPU host, a TPU pod slice with one process per host), checkpoints with Orbax, resumes exactly, and
writes metrics and reconstruction pictures to the workdir.
"""

import dataclasses
import functools
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cratemae import checkpoint
from cratemae import data
from cratemae import diagnostics
from cratemae import flops
from cratemae import metrics as metrics_lib
from cratemae import models
from cratemae import sharding
from cratemae import visualize
from cratemae.train import optimizer
from cratemae.train import step as step_lib

log = logging.getLogger(__name__)


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
    if config.optim.get('schedule_steps') is not None and config.optim.schedule_steps < 1:
        raise ValueError(f'optim.schedule_steps={config.optim.schedule_steps} must be at least 1, or None to follow '
                         'train.steps.')


@dataclasses.dataclass(frozen=True)
class Program:
    """What train_and_evaluate runs on a mesh; launch.aot_compile lowers the same train_step for a TPU slice."""

    model: Any
    init_fn: Callable  # images (1, H, W, C) -> TrainState; jit it with out_shardings=state_shardings
    image_shape: tuple
    state_shardings: step_lib.TrainState
    abstract_state: step_lib.TrainState  # ShapeDtypeStructs carrying state_shardings (restore / AOT targets)
    train_step: Callable  # jitted, the state donated
    eval_step: Callable


def build_program(config, mesh) -> Program:
    """Model and optimizer; shapes first (eval_shape), then shardings from the config's regex rules; the jitted
    steps with explicit shardings and the train state donated so parameters are updated in place."""
    model = models.build(config.model)
    batch, steps = config.train.global_batch, optimizer.schedule_length(config)
    schedule = optimizer.learning_rate_schedule(config.optim, batch, steps)
    tx = optimizer.make_optimizer(config.optim, batch, steps)
    image_shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
    init_fn = functools.partial(step_lib.create_state, model, tx, seed=config.seed)
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
    train_step = jax.jit(
        step_lib.make_train_step(model, tx, schedule, config.optim.accum_steps),
        in_shardings=(state_shardings, {'image': batch_sharding}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        step_lib.make_eval_step(model, config.train.eval_mask_ratio),
        in_shardings=(state_shardings.params, {'image': batch_sharding, 'valid': batch_sharding}, replicated),
    )
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings
    )
    return Program(model, init_fn, image_shape, state_shardings, abstract_sharded, train_step, eval_step)


def train_and_evaluate(
    config, workdir: str, *, allow_config_change: bool = False, fault_kill_at_step: int | None = None
) -> dict:
    """Runs (or resumes) the experiment in ``config`` into ``workdir``; returns the last logged metrics."""
    # ----------------------------------------------------------------------------------------------------------
    # Set up. Everything that can be wrong with the config or the workdir fails here, before any compile.
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    batch_devices = mesh.shape['data'] * mesh.shape['fsdp']
    validate_config(config, batch_devices, jax.process_count())
    checkpoint.ensure_writable(workdir)
    checkpoint.check_compatible(workdir, config, allow_change=allow_config_change)
    checkpoint.save_config(workdir, config)
    log.info(
        'Devices: %d x %s on %d process(es); mesh %s',
        jax.device_count(),
        jax.devices()[0].device_kind,
        jax.process_count(),
        dict(mesh.shape),
    )

    # ----------------------------------------------------------------------------------------------------------
    # Input pipeline: the batch at step s is a pure function of (seed, s, host), so the data position is the step.
    pipeline = functools.partial(data.make_pipeline, config.data, seed=config.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    train_data = pipeline(split=config.data.split_train, global_batch=config.train.global_batch, train=True)
    eval_data = pipeline(split=config.data.split_eval, global_batch=config.train.eval_batch, train=False)

    # ----------------------------------------------------------------------------------------------------------
    # Model, optimizer, state shardings and the jitted steps (shared with launch.aot_compile).
    program = build_program(config, mesh)
    model, state_shardings = program.model, program.state_shardings
    init_fn, image_shape, total_steps = program.init_fn, program.image_shape, config.train.steps
    train_step, eval_step = program.train_step, program.eval_step

    # ----------------------------------------------------------------------------------------------------------
    # Restore the newest good checkpoint, if any (a corrupt newest one is reported and skipped).
    ckpt = checkpoint.Checkpointer.from_config(workdir, config.checkpoint)
    restored = ckpt.restore_latest(program.abstract_state)
    if restored is None:
        state = jax.jit(init_fn, out_shardings=state_shardings)(jnp.zeros(image_shape, jnp.float32))
        start_step, core_hours = 0, 0.0
        log.info('Starting from scratch: %s parameters.', f'{models.count_params(config.model, False):,}')
    else:
        start_step, state, meta = restored
        core_hours = float(meta.get('core_hours', 0.0))
        log.info('Resumed from step %d.', start_step)

    writer = metrics_lib.MetricWriter(workdir, total_steps, start_step=start_step)
    throughput = metrics_lib.Throughput(
        config.train.global_batch, jax.device_count(), start_step=start_step, core_hours=core_hours
    )
    train_flops = flops.train_flops(config.model) * config.train.global_batch
    device_kind = jax.devices()[0].device_kind

    def evaluate(step):
        """Held-out reconstruction loss; a picture of the first batch; the white-box measures on that batch."""
        loss_sum, count, scalars = 0.0, 0.0, {}
        key = jax.random.key(config.seed + 1)  # the same masks at every evaluation, so the curve is comparable
        for i in range(min(config.train.eval_batches, eval_data.num_batches)):
            local = eval_data.batch(i)
            batch = sharding.host_local_to_global({'image': local['image'], 'valid': local['valid']}, mesh)
            out = eval_step(state.params, batch, jax.random.fold_in(key, i))
            loss_sum, count = loss_sum + float(out['loss_sum']), count + float(out['count'])
            if i == 0:
                scalars.update(first_batch_pictures(step, local, batch, out))
        scalars['eval/reconstruction_loss'] = loss_sum / max(count, 1.0)
        writer.write_scalars(step, scalars)
        log.info('step %d: eval reconstruction loss %.4f', step, scalars['eval/reconstruction_loss'])
        return {'eval/reconstruction_loss': scalars['eval/reconstruction_loss']}

    def first_batch_pictures(step, local, batch, out):
        """Reconstruction grid and, for CRATE encoders, the layer-wise white-box measures (scalars and figures)."""
        n = min(config.eval.images, local['image'].shape[0])
        # Every process takes part in the gathers (they are collectives); process 0 draws.
        pred, mask = (np.asarray(multihost_utils.process_allgather(out[k], tiled=True))[:n] for k in ('pred', 'mask'))
        measures = None
        if config.eval.whitebox and config.model.encoder_block == 'crate':
            measures = diagnostics.whitebox_measures(model, state.params, batch['image'], batch['valid'])
        if jax.process_index() != 0:
            return {}
        info = eval_data.info
        grid = visualize.reconstruction_grid(local['image'][:n], pred, mask, config.model.patch_size, info.mean,
                                             info.std, config.model.norm_pix_loss)
        writer.write_images(step, {'reconstructions': grid}, png=True)
        if measures is None:
            return {}
        runs = [(f'step {step}', measures)]
        writer.write_images(step, {'whitebox_layerwise': visualize.layerwise(runs),
                                   'whitebox_mssa_ista': visualize.mssa_ista(runs)}, png=True)
        return diagnostics.flatten_for_logging(measures)

    def save(step, force=False):
        if int(state.nonfinite_step) >= 0:
            raise NonFiniteLossError(
                f'The loss or gradient became NaN/inf at step {int(state.nonfinite_step)}; stopping without saving, so '
                f'the newest checkpoint in {ckpt.directory} is the last good state. Lower optim.base_lr or set '
                'optim.grad_clip, then rerun the same command to resume from it.'
            )
        return ckpt.save(
            step,
            state,
            {
                'data_step': step,
                'seed': config.seed,
                'core_hours': throughput.core_hours,
                'config_hash': checkpoint.config_hash(config),
            },
            force=force,
        )

    # ----------------------------------------------------------------------------------------------------------
    # The loop: plain Python around the jitted step.
    ckpt.install_preemption_handler()
    last = {}
    try:
        with train_data.iterate(start_step) as batches:
            for step, local_batch in batches:
                if step >= total_steps:
                    break
                state, step_metrics = train_step(
                    state, sharding.host_local_to_global({'image': local_batch['image']}, mesh)
                )
                done = step + 1
                if done % config.train.log_every == 0 or done == total_steps:
                    last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    if int(state.nonfinite_step) >= 0:
                        save(done)  # raises NonFiniteLossError naming the step
                    last.update(throughput.measure(done))
                    last['mfu'] = flops.mfu(train_flops, last.get('step_time_s', 0.0), device_kind, jax.device_count())
                    writer.write_scalars(done, {k: v for k, v in last.items() if v is not None})
                writer.update(done, **({'loss': last['loss']} if 'loss' in last else {}))
                if done % config.train.eval_every == 0 or done == total_steps:
                    with throughput.exclude():
                        last.update(evaluate(done))
                if done % config.checkpoint.every == 0 or done == total_steps:  # the last step is always saved
                    with throughput.exclude():
                        save(done, force=True)
                if fault_kill_at_step is not None and done == fault_kill_at_step:
                    # Fault injection for the resume tests: let started saves commit (so the test knows where the rerun
                    # resumes), then die without any cleanup.
                    ckpt.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
                # On several hosts the check is a small blocking collective: make it at log steps only.
                check_preemption = jax.process_count() == 1 or done % config.train.log_every == 0
                if done < total_steps and check_preemption and ckpt.reached_preemption(done):
                    log.warning('Preemption: saving step %d and exiting; rerun the same command to resume.', done)
                    save(done, force=True)
                    break
        if start_step >= total_steps:
            log.info('Nothing to do: the workdir already holds the final step %d.', start_step)
        ckpt.wait_until_finished()
    finally:
        ckpt.uninstall_preemption_handler()
        ckpt.close()
        writer.close()
    return last
