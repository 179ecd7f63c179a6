"""Masked-completion pretraining: the task the engine runs for ``python -m launch.train``.

``train_and_evaluate(config, workdir)`` trains on whatever devices JAX sees (one CPU, a GPU host, a TPU pod slice with
one process per host), checkpoints with Orbax, resumes exactly, and writes metrics and reconstruction pictures to the
workdir. The loop itself is ``cratemae.train.engine``; this module says what a step, an evaluation and a picture are.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cratemae import diagnostics
from cratemae import flops
from cratemae import models
from cratemae import visualize
from cratemae.data import augment
from cratemae.data import device
from cratemae.train import engine
from cratemae.train import step as step_lib


class Pretrain:
    """Reconstruct the masked patches: loss = mean squared error on the masked patches (cratemae.ops)."""

    train_keys = ('image',)
    eval_keys = ('image', 'valid')
    eval_sums = ('loss_sum', 'count')
    eval_whole_split = False  # config.train.eval_batches batches

    def __init__(self, config, data_info=None):
        del data_info  # pretraining needs no labels
        self.config = config
        self.model = models.build(config.model)

    def init(self, tx, images):
        return step_lib.create_state(self.model, tx, images, seed=self.config.seed)

    def warm_start(self, state, tx, state_shardings):
        del tx, state_shardings  # pretraining starts from the random initialisation
        return state

    def train_step(self, tx, schedule):
        return step_lib.make_train_step(self.model, tx, schedule, self.config.optim.accum_steps)

    def eval_step(self, params, batch, key):
        return step_lib.make_eval_step(self.model, self.config.train.eval_mask_ratio)(params, batch, key)

    def eval_scalars(self, sums):
        return {'eval/reconstruction_loss': sums['loss_sum'] / max(sums['count'], 1.0)}

    def train_flops_per_image(self):
        return flops.train_flops(self.config.model, self.config.train.global_batch)

    def train_batch_shapes(self, global_batch):
        return {'image': jax.ShapeDtypeStruct((global_batch,) + self.image_shape, jnp.uint8)}

    @property
    def image_shape(self):
        m = self.config.model
        return (m.image_size, m.image_size, m.channels)

    def pictures(self, step, params, local, batch, out, info, writer, workdir):
        """Reconstruction grid and, for CRATE encoders, the layer-wise white-box measures (scalars and figures)."""
        del workdir  # the figures are arrays, logged by the writer
        config = self.config
        n = min(config.eval.images, local['image'].shape[0])
        # Every process takes part in the gathers (they are collectives); process 0 draws.
        pred, mask = (np.asarray(multihost_utils.process_allgather(out[k], tiled=True))[:n] for k in ('pred', 'mask'))
        measures = None
        if config.eval.whitebox and config.model.encoder_block == 'crate':
            images = device.normalize(batch['image'], info.mean, info.std)  # the batches travel as uint8
            measures = diagnostics.whitebox_measures(self.model, params, images, batch['valid'])
        if jax.process_index() != 0:
            return {}
        grid = visualize.reconstruction_grid(
            augment.normalize(local['image'][:n], info.mean, info.std),
            pred,
            mask,
            config.model.patch_size,
            info.mean,
            info.std,
            config.model.norm_pix_loss,
        )
        writer.write_images(step, {'reconstructions': grid}, png=True)
        if measures is None:
            return {}
        runs = [(f'step {step}', measures)]
        writer.write_images(
            step,
            {'whitebox_layerwise': visualize.layerwise(runs), 'whitebox_mssa_ista': visualize.mssa_ista(runs)},
            png=True,
        )
        return diagnostics.flatten_for_logging(measures)


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) the pretraining experiment in ``config`` into ``workdir``; returns the last logged metrics."""
    return engine.run(config, workdir, Pretrain, allow_config_change=allow_config_change)
