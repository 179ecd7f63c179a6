"""Full fine-tuning of a pretrained encoder with a classification head: the task the engine runs for
``python -m launch.finetune``.

``finetune_and_evaluate(config, workdir)`` runs it in ``cratemae.train.engine``, the loop pretraining runs in, so it
resumes exactly from the newest good checkpoint, saves on SIGTERM, stops on a non-finite loss and logs the same
metrics and throughput. The model is

    logits = Dense(LN(pool(LN_enc(encoder(x)))))     pool = class token or mean of the patch tokens; LN optional,

the encoder initialised from ``config.finetune.checkpoint`` (a training workdir, an export, or a reference file) and
the head from scratch. The recipe is the transfer recipe of the reference's ``finetune.py``: AdamW with betas
(0.9, 0.999) and weight decay 0.01, a cosine schedule without warmup, RandomResizedCrop + flip (the data pipeline's
'mae' augmentation with ``crop_scale``) and RandAugment (``data.randaugment``), cross-entropy with configurable label
smoothing.
"""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from cratemae import data
from cratemae import models
from cratemae.data import splits as split_lib
from cratemae.evaluate import checkpoints
from cratemae.train import engine
from cratemae.train.step import fresh_state
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
    return Classifier(
        models.build(config.model),
        num_classes,
        config.finetune.pool,
        config.finetune.head_norm,
        config.finetune.head_init_std,
    )


class Finetune:
    """Cross-entropy against (1 - e) onehot + e / C targets; top-1 accuracy over the whole eval split."""

    train_keys = ('image', 'label')
    eval_keys = ('image', 'label', 'valid')
    eval_sums = ('correct', 'loss_sum', 'count')
    eval_whole_split = True

    def __init__(self, config, data_info=None, num_classes=None):
        """The class count comes from the data read (``data_info``), checked against ``config.finetune.num_classes``
        when that is set, or from ``num_classes`` alone where no data is read (AOT compiles, benchmarks)."""
        if data_info is not None:
            if data_info.num_classes is None:
                raise ValueError(
                    f'Dataset {config.data.name!r} has no labels (num_classes is None); fine-tuning needs them.'
                )
            stated = config.finetune.get('num_classes')
            if stated is not None and stated != data_info.num_classes:
                raise ValueError(
                    f'config.finetune.num_classes={stated} but {config.data.name!r} has {data_info.num_classes} '
                    f'classes; set --config.finetune.num_classes={data_info.num_classes}.'
                )
            num_classes = data_info.num_classes
        self.config = config
        self.num_classes = num_classes
        self.model = build_classifier(config, self.num_classes)

    def init(self, tx, images):
        """The head initialised from config.seed; the backbone too, until warm_start puts the pretrained one in."""
        init_key, train_key = jax.random.split(jax.random.key(self.config.seed))
        return fresh_state(self.model.init(init_key, images)['params'], tx, train_key)

    def warm_start(self, state, tx, state_shardings):
        """The pretrained encoder params (checked against config.model) in place of the random backbone."""
        path = self.config.finetune.checkpoint  # checked to be set by finetune_and_evaluate
        ft = self.config.finetune
        ckpt = checkpoints.load(
            path,
            step=ft.get('step'),
            model_config=self.config.model,
            encoder_only=True,
            trust_checkpoint=ft.get('trust_checkpoint', False),
        )
        checkpoints.check_params(ckpt.params, self.config.model, what=f'checkpoint {path}')
        log.info('Encoder from %s (%s, step %s).', path, ckpt.source, ckpt.step)

        def put(state, backbone):
            params = dict(state.params, backbone=backbone)
            return state.replace(params=params, opt_state=tx.init(params))

        return jax.jit(
            put,
            in_shardings=(state_shardings, state_shardings.params['backbone']),
            out_shardings=state_shardings,
            donate_argnums=0,
        )(state, ckpt.params)

    def train_step(self, tx, schedule):
        model, num_classes, smoothing = self.model, self.num_classes, self.config.finetune.label_smoothing

        def loss_fn(params, images, labels):
            logits = model.apply({'params': params}, images)
            targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
            return optax.softmax_cross_entropy(logits, targets).mean(), logits

        def train_step(state, batch):
            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch['image'], batch['label']
            )
            new_state, grad_norm = guarded_update(state, tx, loss, grads)
            return new_state, {
                'loss': loss,
                'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                'grad_norm': grad_norm,
                'learning_rate': schedule(state.step),
            }

        return train_step

    def eval_step(self, params, batch, key):
        """Sums of correct predictions, cross-entropy and valid samples (the key is unused: no randomness)."""
        del key
        logits = self.model.apply({'params': params}, batch['image'])
        valid = batch['valid'].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
        return {'correct': jnp.sum(correct * valid), 'loss_sum': jnp.sum(loss * valid), 'count': jnp.sum(valid)}

    def eval_scalars(self, sums):
        count = max(sums['count'], 1.0)
        return {'eval/top1': sums['correct'] / count, 'eval/loss': sums['loss_sum'] / count}

    def train_flops_per_image(self):
        return None  # cratemae.flops counts the masked autoencoder, not an encoder on whole images with a head

    def train_batch_shapes(self, global_batch):
        m = self.config.model
        return {
            'image': jax.ShapeDtypeStruct((global_batch, m.image_size, m.image_size, m.channels), jnp.uint8),
            'label': jax.ShapeDtypeStruct((global_batch,), jnp.int32),
        }

    def pictures(self, step, params, local, batch, out, info, writer, workdir):
        del step, params, local, batch, out, info, writer, workdir  # no pictures for classification
        return {}


def config_num_classes(config) -> int:
    """The class count a fine-tuning config states (for compiling without reading its data), or a one-line error."""
    n = config.finetune.get('num_classes')
    if not isinstance(n, int) or n < 1:
        raise ValueError(
            f'{config.get("name") or "this fine-tuning config"} does not state its class count, and compiling '
            f'without its data cannot count them: pass --config.finetune.num_classes=N (got {n!r}).'
        )
    return n


def resolve_splits(config) -> str:
    """Resolves ``config.data``'s splits in place ('auto' -> the split the data has; ``finetune.holdout`` -> slices
    of the train split) and refuses an evaluation split that shares images with the training split unless
    ``finetune.eval_on_train``; returns a note saying what was chosen. Decodes no image; rerunning it is a no-op."""
    ft, d = config.finetune, config.data
    dataset = data.resolve(d)
    d.split_train = dataset.split(d.split_train)
    if not ft.get('holdout'):
        d.split_eval = dataset.split(d.split_eval)
    d.split_train, d.split_eval, note = split_lib.held_out(
        d.split_train,
        d.split_eval,
        holdout=ft.get('holdout'),
        eval_on_train=ft.get('eval_on_train', False),
        what='a fine-tuning accuracy',
    )
    d.split_eval = dataset.split(d.split_eval)
    if ft.get('holdout'):
        ft.holdout = None  # the splits now say it
    return note


def finetune_and_evaluate(config, workdir: str) -> dict:
    """Fine-tunes (or resumes fine-tuning) into ``workdir``; returns the last metrics incl. 'eval/top1'."""
    if 'finetune' not in config:
        raise ValueError(f'{config.get("name")} is a pretraining config; fine-tuning needs a finetune_* entry.')
    if not config.finetune.checkpoint:
        raise ValueError(
            'config.finetune.checkpoint is not set: pass --checkpoint PATH (a training workdir, an '
            'export, or a reference-format file).'
        )
    log.info('Fine-tuning splits: %s.', resolve_splits(config))
    last = engine.run(config, workdir, Finetune)
    if 'eval/top1' in last and jax.process_index() == 0:
        result = {
            'top1': last['eval/top1'],
            'step': last['step'],
            'checkpoint': config.finetune.checkpoint,
            'dataset': config.data.name,
            'split': config.data.split_eval,
            'split_train': config.data.split_train,
            'held_out': split_lib.disjoint(config.data.split_train, config.data.split_eval),
        }
        (epath.Path(workdir) / RESULTS_FILE).write_text(json.dumps(result, indent=2))
    return last
