"""The train state and the jitted masked-completion train and eval steps."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from cratemae import models
from cratemae import ops


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the config: the data position is ``step`` itself (the batch at step s
    is a pure function of (seed, s, host)), and the masking noise of step s is drawn from fold_in(rng, s)."""

    step: jax.Array  # int32 scalar: the number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so Orbax stores it as a plain array
    nonfinite_step: jax.Array  # int32 scalar: first step whose loss or gradient was not finite, -1 if none


def create_state(model, tx, images, seed: int) -> TrainState:
    """Initial state (call under jax.jit with out_shardings so parameters are created where they live)."""
    params = models.init_params(model, images, seed)
    train_key = jax.random.split(jax.random.key(seed), 3)[2]  # the key init_params leaves for training
    return fresh_state(params, tx, train_key)


def fresh_state(params, tx, train_key) -> TrainState:
    """Step 0 of any task: these parameters, a new optimizer state, the training key, no non-finite step yet."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_key),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def masking_noise(state: TrainState, batch_size: int, num_patches: int) -> jax.Array:
    """Uniform noise for step ``state.step``: the same values whatever the sharding or the microbatching."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return jax.random.uniform(key, (batch_size, num_patches))


def guarded_update(state, tx, loss, grads):
    """Applies the optimizer update unless the loss or the gradient norm is not finite, or an earlier step was not.

    A skipped update keeps params and optimizer state as they were and records the step in ``nonfinite_step``, so
    the host can stop the run with the last good state. Returns (new_state, gradient norm).
    """
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_step=jnp.where(ok | (state.nonfinite_step >= 0), state.nonfinite_step, state.step),
    )
    return new_state, grad_norm


def make_train_step(model, tx, schedule, accum_steps: int = 1):
    """Returns train_step(state, batch) -> (state, metrics).

    With accum_steps = k > 1 the batch is split into k equal microbatches whose gradients are averaged in a
    ``lax.scan``. The masking noise is drawn for the whole batch first, and every sample masks the same number of
    patches, so the averaged loss and gradient equal those of the full batch (up to summation order).

    A non-finite loss or gradient norm skips the update and records the step in ``nonfinite_step``; every later
    update is skipped too, so the state stays the last good one for the host to report.
    """

    def loss_fn(params, images, noise):
        return model.apply({'params': params}, images, noise=noise)['loss']

    def train_step(state, batch):
        images = batch['image']
        noise = masking_noise(state, images.shape[0], model.num_patches)
        if accum_steps == 1:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, images, noise)
        else:
            micro = lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])  # noqa: E731

            def accumulate(carry, xs):
                loss, grads = jax.value_and_grad(loss_fn)(state.params, *xs)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro(images), micro(noise)))
            loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))

        new_state, grad_norm = guarded_update(state, tx, loss, grads)
        metrics = {
            'loss': loss,
            'grad_norm': grad_norm,
            'param_norm': optax.tree.norm(new_state.params),
            'learning_rate': schedule(state.step),
        }
        return new_state, metrics

    return train_step


def make_eval_step(model, mask_ratio=None):
    """Returns eval_step(params, batch, key) -> dict(loss_sum, count, pred, mask) over the valid samples.

    Padded samples of a last partial batch carry batch['valid'] = False and are excluded from the sums.
    """

    def eval_step(params, batch, key):
        images = batch['image']
        noise = jax.random.uniform(key, (images.shape[0], model.num_patches))
        out = model.apply({'params': params}, images, noise=noise, mask_ratio=mask_ratio)
        per_sample = ops.per_sample_reconstruction_loss(
            out['pred'], ops.patchify(images, model.patch_size), out['mask'], model.norm_pix_loss
        )
        valid = batch.get('valid', jnp.ones(images.shape[:1], bool)).astype(jnp.float32)
        return {
            'loss_sum': jnp.sum(per_sample * valid),
            'count': jnp.sum(valid),
            'pred': out['pred'],
            'mask': out['mask'],
        }

    return eval_step
