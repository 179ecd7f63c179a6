"""Families of registered entries run one after another (``python -m launch.sweep``): which entries a pattern names,
the shortened schedule they run with, and the table row of a finished run."""

import fnmatch

from cratemae import models
from cratemae.evaluate import ablation
from experiments import registry


def sweep_names(pattern, include_base=True):
    """The matching registry names, bases first (a family is read against its base)."""
    names = [n for n in registry.names() if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        raise ValueError(f'no registered experiment matches {pattern!r}; `python -m launch.list` shows the names.')
    bases = []
    for name in names if include_base else ():
        base = _declared(name)[0]
        if base and base not in names + bases:
            bases.append(base)
    return bases + names


def sweep_config(name, steps=None, dataset=None):
    config = registry.get_config(name)
    if steps is not None:
        config.train.update(steps=steps, eval_every=steps)
        config.checkpoint.every = steps
    if dataset is not None:
        config.data.name = dataset
    return config


def _declared(name):
    try:
        return registry.declared_overrides(name)
    except ValueError:
        return None, None


def row(name, config, workdir):
    """The table row of one finished run: what it is, then ablation.evaluate_run's measures."""
    overrides = _declared(name)[1]
    changes = ', '.join(f'{k}={v}' for k, v in sorted(overrides.items())) if overrides else 'base'
    return {
        'name': name,
        'changes': changes,
        'params': models.count_params(config.model),
        'steps': config.train.steps,
        **ablation.evaluate_run(workdir),
    }
