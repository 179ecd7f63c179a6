"""Full fine-tuning of a pretrained encoder with a classification head, on the pretraining engine's pieces.

``finetune_and_evaluate(config, workdir)`` is what ``python -m launch.finetune`` runs. It reads like
``cratemae.train.loop``: the same mesh and regex shardings, the same Orbax ``Checkpointer`` (resume from the newest
good step, SIGTERM saves), the same ``MetricWriter`` and deterministic data pipelines. The model is

    logits = Dense(LN(pool(LN_enc(encoder(x)))))     pool = class token or mean of the patch tokens; LN optional,

the encoder initialised from ``config.finetune.checkpoint`` (a training workdir, an export, or a reference file) and
the head from scratch. The recipe is the transfer recipe of the reference's ``finetune.py``: AdamW with betas
(0.9, 0.999) and weight decay 0.01, a cosine schedule without warmup, RandomResizedCrop + flip (the data pipeline's
'mae' augmentation with ``crop_scale``) and RandAugment (``data.randaugment``), cross-entropy with configurable label
smoothing.
"""

import functools
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from cratemae import checkpoint
from cratemae import data
from cratemae import metrics as metrics_lib
from cratemae import models
from cratemae import sharding
from cratemae.evaluate import checkpoints
from cratemae.train import optimizer
from cratemae.train.loop import NonFiniteLossError
from cratemae.train.loop import validate_config
from cratemae.train.step import TrainState
from cratemae.train.step import guarded_update

log = logging.getLogger(__name__)

POOLS = ('cls', 'mean')
RESULTS_FILE = 'finetune_results.json'


class Classifier(nn.Module):
    """A MaskedAutoencoder's encoder (params under 'backbone') followed by [LayerNorm] and a Dense head."""

    backbone: nn.Module  # only its encode() is called, so the decoder has no params here
    num_classes: int
    pool: str = 'cls'
    head_norm: bool = True
    head_init_std: float = 2e-5  # FAIR's fine-tuning head init; near zero, so the first steps train the head

    @nn.compact
    def __call__(self, images):
        z = self.backbone.encode(images)
        f = z[:, 0] if self.pool == 'cls' else jnp.mean(z[:, 1:], axis=1)
        if self.head_norm:
            f = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name='head_norm')(f)
        kernel_init = nn.initializers.truncated_normal(self.head_init_std)
        return nn.Dense(self.num_classes, kernel_init=kernel_init, name='head')(f.astype(jnp.float32))


def build_classifier(config, num_classes):
    if config.finetune.pool not in POOLS:
        raise ValueError(f'finetune.pool={config.finetune.pool!r}; choose one of {POOLS}.')
    return Classifier(models.build(config.model), num_classes, config.finetune.pool, config.finetune.head_norm,
                      config.finetune.head_init_std)


def create_state(model, tx, images, backbone, seed):
    """TrainState with the head initialised from ``seed`` and the backbone params given (call under jit)."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    params = dict(model.init(init_key, images)['params'], backbone=backbone)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(train_key), nonfinite_step=jnp.full((), -1, jnp.int32))


def make_train_step(model, tx, schedule, num_classes, label_smoothing=0.0):
    """train_step(state, batch) -> (state, metrics): cross-entropy against (1 - e) onehot + e / C targets."""

    def loss_fn(params, images, labels):
        logits = model.apply({'params': params}, images)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean(), logits

    def train_step(state, batch):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch['image'], batch['label'])
        new_state, grad_norm = guarded_update(state, tx, loss, grads)
        return new_state, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                           'grad_norm': grad_norm, 'learning_rate': schedule(state.step)}

    return train_step


def make_eval_step(model):
    """eval_step(params, batch) -> sums of correct predictions, cross-entropy and valid samples."""

    def eval_step(params, batch):
        logits = model.apply({'params': params}, batch['image'])
        valid = batch['valid'].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
        return {'correct': jnp.sum(correct * valid), 'loss_sum': jnp.sum(loss * valid), 'count': jnp.sum(valid)}

    return eval_step


def _pipelines(config):
    kwargs = {'seed': config.seed, 'process_index': jax.process_index(), 'process_count': jax.process_count()}
    train_data = data.make_pipeline(config.data, split=config.data.split_train, global_batch=config.train.global_batch,
                                    train=True, **kwargs)
    eval_data = data.make_pipeline(config.data, split=config.data.split_eval, global_batch=config.train.eval_batch,
                                   train=False, **kwargs)
    if train_data.info.num_classes is None:
        raise ValueError(f'Dataset {config.data.name!r} has no labels (num_classes is None); fine-tuning needs them.')
    return train_data, eval_data


def _initial_backbone(config):
    """The pretrained encoder params, checked against config.model (keys, shapes, architecture)."""
    path = config.finetune.checkpoint
    if not path:
        raise ValueError('config.finetune.checkpoint is not set: pass --checkpoint PATH (a training workdir, an '
                         'export, or a reference-format file).')
    ckpt = checkpoints.load(path, step=config.finetune.get('step'), model_config=config.model, encoder_only=True,
                            trust_checkpoint=config.finetune.get('trust_checkpoint', False))
    checkpoints.check_params(ckpt.params, config.model, what=f'checkpoint {path}')
    log.info('Encoder from %s (%s, step %s).', path, ckpt.source, ckpt.step)
    return ckpt.params


def finetune_and_evaluate(config, workdir: str) -> dict:
    """Fine-tunes (or resumes fine-tuning) into ``workdir``; returns the last metrics incl. 'eval/top1'."""
    # Set up: everything that can be wrong fails before compiling.
    workdir = checkpoints.absolute(workdir)  # Orbax refuses relative paths
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    validate_config(config, mesh.shape['data'] * mesh.shape['fsdp'], jax.process_count())
    checkpoint.ensure_writable(workdir)
    checkpoint.check_compatible(workdir, config)
    train_data, eval_data = _pipelines(config)
    num_classes = train_data.info.num_classes
    model = build_classifier(config, num_classes)
    total_steps, schedule_steps = config.train.steps, optimizer.schedule_length(config)
    schedule = optimizer.learning_rate_schedule(config.optim, config.train.global_batch, schedule_steps)
    tx = optimizer.make_optimizer(config.optim, config.train.global_batch, schedule_steps)

    # Shard: shapes first, then shardings from the regex rules, as in pretraining.
    image_shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    backbone_shapes = checkpoints.abstract_params(config.model, encoder_only=True)
    init_fn = functools.partial(create_state, model, tx, seed=config.seed)
    abstract_state = jax.eval_shape(init_fn, images, backbone_shapes)
    replicated = sharding.replicated(mesh)
    state_shardings = TrainState(
        step=replicated, params=sharding.param_shardings(abstract_state.params, config.sharding_rules, mesh),
        opt_state=sharding.param_shardings(abstract_state.opt_state, config.sharding_rules, mesh),
        rng=replicated, nonfinite_step=replicated)

    # Resume from our own newest good checkpoint, else start from the pretrained encoder.
    ckpt = checkpoint.Checkpointer.from_config(workdir, config.checkpoint)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_shardings)
    restored = ckpt.restore_latest(abstract_sharded)
    if restored is None:
        backbone = _initial_backbone(config)
        state = jax.jit(init_fn, in_shardings=(replicated, state_shardings.params['backbone']),
                        out_shardings=state_shardings)(jnp.zeros(image_shape, jnp.float32), backbone)
        start_step = 0
    else:
        start_step, state, _ = restored
        log.info('Resumed fine-tuning from step %d.', start_step)
    if not (epath.Path(workdir) / checkpoint.CONFIG_FILE).exists():  # the first run's config (check_compatible)
        checkpoint.save_config(workdir, config)

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(model, tx, schedule, num_classes, config.finetune.label_smoothing),
        in_shardings=(state_shardings, {'image': batch_sharding, 'label': batch_sharding}),
        out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model), in_shardings=(
        state_shardings.params, {'image': batch_sharding, 'label': batch_sharding, 'valid': batch_sharding}))
    writer = metrics_lib.MetricWriter(workdir, total_steps, start_step=start_step)
    throughput = metrics_lib.Throughput(config.train.global_batch, jax.device_count(), start_step=start_step)

    def evaluate(step):
        """Top-1 accuracy and cross-entropy over the whole eval split."""
        sums = {'correct': 0.0, 'loss_sum': 0.0, 'count': 0.0}
        for i in range(eval_data.num_batches):
            local = eval_data.batch(i)
            out = eval_step(state.params, sharding.host_local_to_global(local, mesh))
            sums = {k: v + float(out[k]) for k, v in sums.items()}
        scalars = {'eval/top1': sums['correct'] / max(sums['count'], 1.0),
                   'eval/loss': sums['loss_sum'] / max(sums['count'], 1.0)}
        writer.write_scalars(step, scalars)
        log.info('step %d: eval top-1 %.4f, loss %.4f', step, scalars['eval/top1'], scalars['eval/loss'])
        return scalars

    def save(step, force=False):
        if int(state.nonfinite_step) >= 0:
            raise NonFiniteLossError(f'The loss or gradient became NaN/inf at step {int(state.nonfinite_step)}; '
                                     f'the newest checkpoint in {ckpt.directory} is the last good state. Lower '
                                     'optim.base_lr or set optim.grad_clip, then rerun to resume.')
        return ckpt.save(step, state, {'data_step': step, 'config_hash': checkpoint.config_hash(config)}, force=force)

    ckpt.install_preemption_handler()
    last = {}
    try:
        with train_data.iterate(start_step) as batches:
            for step, local in batches:
                if step >= total_steps:
                    break
                batch = sharding.host_local_to_global({'image': local['image'], 'label': local['label']}, mesh)
                state, step_metrics = train_step(state, batch)
                done = step + 1
                if done % config.train.log_every == 0 or done == total_steps:
                    last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    last.update(throughput.measure(done))
                    writer.write_scalars(done, last)
                writer.update(done, **({'loss': last['loss']} if 'loss' in last else {}))
                if done % config.train.eval_every == 0 or done == total_steps:
                    with throughput.exclude():
                        last.update(evaluate(done))
                with throughput.exclude():
                    save(done, force=done == total_steps)
                if done < total_steps and ckpt.reached_preemption(done):
                    log.warning('Preemption: saving step %d and exiting; rerun the same command to resume.', done)
                    save(done, force=True)
                    break
        if start_step >= total_steps:
            last.update(evaluate(start_step))
        ckpt.wait_until_finished()
    finally:
        ckpt.uninstall_preemption_handler()
        ckpt.close()
        writer.close()
    if 'eval/top1' in last and jax.process_index() == 0:
        result = {'top1': last['eval/top1'], 'step': max(start_step, min(total_steps, int(state.step))),
                  'checkpoint': config.finetune.checkpoint, 'dataset': config.data.name,
                  'split': config.data.split_eval}
        (epath.Path(workdir) / RESULTS_FILE).write_text(json.dumps(result, indent=2))
    return last
