"""FAIR MAE's pretraining optimizer recipe (docs/model.md §5), as optax transformations.

AdamW with betas (b1, b2) = (0.9, 0.95); weight decay only on parameters with >= 2 dimensions (which, as in timm's
``add_weight_decay``, includes the class and mask tokens, U, W_o, D and A but no bias or LayerNorm parameter);
lr = base_lr * global_batch / 256 with a linear warmup and a half-cosine decay to min_lr, updated every step;
optional clipping of the global gradient norm.
"""

import jax
import optax


def peak_learning_rate(optim_config, global_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return optim_config.base_lr * global_batch / 256


def schedule_length(config) -> int:
    """Steps of the learning-rate schedule: ``optim.schedule_steps`` when set, else ``train.steps``."""
    steps = config.optim.get('schedule_steps')
    return int(config.train.steps if steps is None else steps)


def learning_rate_schedule(optim_config, global_batch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then a half-cosine from the peak to min_lr at total_steps.

    lr(s) = peak * s / W for s < W;  min + (peak - min) * (1 + cos(pi (s - W) / (T - W))) / 2 after.
    """
    peak = peak_learning_rate(optim_config, global_batch)
    warmup = min(int(optim_config.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_config.min_lr,
    )


def decay_mask(params):
    """True for the parameters that get weight decay: every leaf with two or more dimensions."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, global_batch: int, total_steps: int) -> optax.GradientTransformation:
    """The optax chain: [clip by global norm] -> AdamW(schedule, b1, b2, wd on >= 2-D leaves)."""
    schedule = learning_rate_schedule(optim_config, global_batch, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=1e-8,
        weight_decay=optim_config.weight_decay,
        mask=decay_mask,
    )
    if optim_config.grad_clip:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adamw)
    return adamw
