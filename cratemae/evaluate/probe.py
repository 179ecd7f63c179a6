"""Linear probes on frozen features: the MAE protocol (BatchNorm + linear head, SGD-family) and a closed-form ridge.

MAE protocol (He et al. 2022, FAIR ``main_linprobe.py``): the head is
    logits = W BN(f) + b,   BN without affine parameters, eps 1e-6 (it only standardises the features),
W initialised from a truncated normal with std 0.01, trained with cross-entropy on the cached features, lr =
base_lr * batch / 256, linear warmup then a per-step cosine. FAIR uses LARS (blr 0.1, weight decay 0, batch 16384,
90 epochs, 10 warmup epochs). LARS moves W by at most lr * 0.001 * |W| per step, so it needs thousands of steps at a
large rate (ImageNet at batch 16384 has 7,000); on a few thousand examples it hardly leaves the initialisation (38%
vs 79% for SGD on the same MNIST features, docs/evaluation.md). Our default is therefore SGD with momentum 0.9 (the
other recipe of the MAE ports) with FAIR's blr, epochs and warmup; ``optimizer='lars'`` with ``batch_size=16384``
is FAIR's exact recipe for ImageNet-sized data.

Ridge probe (big_vision's few-shot "lsr" probe, here on the full train split): features standardised with the train
mean and std, targets one-hot y in {0, 1}^C centred, and
    W(lambda) = argmin_W |X_c W - Y_c|^2 + n lambda |W|^2 = V diag(s / (s^2 + n lambda)) U^T Y_c
(X_c = X - mean(X) = U S V^T, Y_c = Y - mean(Y)), one-vs-rest: the class is argmax of (x - mean(X)) W + mean(Y).
lambda is chosen by accuracy on a held-out part of the train split, then W is refitted on all of it.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ('lars', 'sgd', 'adamw')


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """Hyper-parameters of the MAE-protocol probe; lr = base_lr * batch_size / 256 (the linear scaling rule)."""

    optimizer: str = 'sgd'  # 'lars' for FAIR's ImageNet recipe (with batch_size=16384), see the module docstring
    base_lr: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 256
    seed: int = 0


class ProbeHead(nn.Module):
    """BN(f) without affine (eps 1e-6) then a Dense layer; running statistics are used at evaluation."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False, use_scale=False)(
            x
        )  # torch momentum 0.1 = flax momentum 0.9
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01))(x)


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: LinearProbeConfig, steps_per_epoch: int, batch_size: int):
    """optax chain for ``cfg``: linear warmup then half-cosine to 0, per step; decay and LARS on matrices only."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f'Unknown probe optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}.')
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.base_lr * batch_size / 256, warmup, total)
    if cfg.optimizer == 'lars':  # FAIR's LARS excludes biases and norms from decay and from the trust ratio
        return optax.lars(
            schedule,
            weight_decay=cfg.weight_decay,
            weight_decay_mask=_matrices,
            trust_ratio_mask=_matrices,
            momentum=cfg.momentum,
        )
    if cfg.optimizer == 'sgd':
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, _matrices), optax.sgd(schedule, momentum=cfg.momentum)
        )
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_matrices)


def _epoch_fn(head, tx):
    """One epoch as a lax.scan over (steps, batch, d) features."""

    def loss_fn(params, stats, x, y):
        logits, updates = head.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates['batch_stats']

    def step(carry, batch):
        params, stats, opt_state = carry
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    @jax.jit
    def epoch(carry, xs, ys):
        carry, losses = jax.lax.scan(step, carry, (xs, ys))
        return carry, jnp.mean(losses)

    return epoch


def _predict(head, variables, x, chunk=8192):
    fn = jax.jit(lambda v, x: jnp.argmax(head.apply(v, x, train=False), -1))
    return np.concatenate([np.asarray(fn(variables, x[i : i + chunk])) for i in range(0, len(x), chunk)])


def linear_probe(train_x, train_y, test_x, test_y, num_classes, cfg: LinearProbeConfig = LinearProbeConfig()):
    """Trains the MAE-protocol head on (train_x, train_y); returns top-1 on test and train, and the final loss."""
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    n = len(train_x)
    batch = min(cfg.batch_size, n)
    steps = n // batch  # drop the last partial batch, as FAIR's loader does
    head = ProbeHead(num_classes)
    variables = head.init(jax.random.key(cfg.seed), train_x[:2], train=False)
    tx = make_optimizer(cfg, steps, batch)
    carry = (variables['params'], variables['batch_stats'], tx.init(variables['params']))
    epoch = _epoch_fn(head, tx)
    rng = np.random.default_rng(cfg.seed)
    loss = float('nan')
    for _ in range(cfg.epochs):
        order = rng.permutation(n)[: steps * batch].reshape(steps, batch)
        carry, loss = epoch(carry, train_x[order], np.asarray(train_y)[order])
    final = {'params': carry[0], 'batch_stats': carry[1]}
    return {
        'top1': accuracy(_predict(head, final, test_x), test_y),
        'train_top1': accuracy(_predict(head, final, train_x), train_y),
        'final_loss': float(loss),
        'config': dataclasses.asdict(cfg),
    }


def accuracy(pred, labels) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


# ----------------------------------------------------------------------------------------------------------------
# Closed-form ridge.


def standardize(train_x, *others):
    """(x - mean_train) / std_train for every array; dimensions that are constant on train get std 1."""
    mean = train_x.mean(0)
    std = train_x.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    return [(x - mean) / std for x in (train_x, *others)]


def _ridge_fits(x, y_onehot, lambdas):
    """{lambda: predict} for W = V diag(s / (s^2 + n lambda)) U^T Y_c, X_c = U S V^T centred; one SVD for all."""
    x_mean, y_mean = x.mean(0), y_onehot.mean(0)
    u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
    uty = u.T @ (y_onehot - y_mean)

    def predictor(lam):
        w = vt.T @ ((s / (s**2 + len(x) * lam))[:, None] * uty)
        return lambda z: np.argmax((z - x_mean) @ w + y_mean, -1)  # the intercept is the class frequency

    return {lam: predictor(lam) for lam in lambdas}


RIDGE_LAMBDAS = tuple(10.0 ** np.arange(-6, 3.5, 0.5))


def ridge_probe(train_x, train_y, test_x, test_y, num_classes, *, lambdas=RIDGE_LAMBDAS, holdout=0.2, seed=0):
    """One-vs-rest least squares; lambda chosen on a held-out ``holdout`` fraction of train; returns top-1 etc."""
    train_x, test_x = standardize(np.asarray(train_x, np.float64), np.asarray(test_x, np.float64))
    train_y = np.asarray(train_y)
    onehot = np.eye(num_classes)[train_y]
    perm = np.random.default_rng(seed).permutation(len(train_x))
    n_val = max(1, round(holdout * len(train_x)))
    val, fit = perm[:n_val], perm[n_val:]
    scores = {
        lam: accuracy(predict(train_x[val]), train_y[val])
        for lam, predict in _ridge_fits(train_x[fit], onehot[fit], lambdas).items()
    }
    best = max(sorted(scores, reverse=True), key=scores.get)  # ties: the stronger regularisation
    predict = _ridge_fits(train_x, onehot, [best])[best]
    return {
        'top1': accuracy(predict(test_x), test_y),
        'train_top1': accuracy(predict(train_x), train_y),
        'lambda': float(best),
        'holdout_top1': scores[best],
    }


# ----------------------------------------------------------------------------------------------------------------
# All probes on one pair of feature sets.

METHODS = ('linear', 'ridge', 'knn')


def run_probes(train, test, methods=METHODS, linear_cfg: LinearProbeConfig = LinearProbeConfig(), knn_kwargs=None):
    """{method: results} for ``train``/``test`` ``features.Features``; each result has 'top1' in [0, 1]."""
    from cratemae.evaluate import knn  # pylint: disable=import-outside-toplevel

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f'Unknown probe method(s) {unknown}; choose from {METHODS}.')
    num_classes = max(train.num_classes or 0, int(train.y.max()) + 1, int(test.y.max()) + 1)
    out = {}
    if 'linear' in methods:
        out['linear'] = linear_probe(train.x, train.y, test.x, test.y, num_classes, linear_cfg)
    if 'ridge' in methods:
        out['ridge'] = ridge_probe(train.x, train.y, test.x, test.y, num_classes)
    if 'knn' in methods:
        kwargs = {'k': 20, 'temperature': 0.07, 'vote': 'weighted', **(knn_kwargs or {})}
        out['knn'] = {'top1': knn.knn_accuracy(train.x, train.y, test.x, test.y, num_classes, **kwargs), **kwargs}
    return out
