"""The experiment registry: every named configuration of cratemae, in one explicit table.

Run one with

  python -m launch.train --config=NAME --workdir=DIR [--config.KEY=VALUE ...]

(``--config=experiments/registry.py:NAME`` is the same) and list them with ``python -m launch.list [--grep PATTERN]``,
which also shows the file and line that define each. An entry is a function returning a ``ml_collections.ConfigDict``
with the sections ``model``, ``data``, ``optim``, ``train``, ``checkpoint`` (plus ``mesh``, ``sharding_rules`` and
``eval``; fine-tuning entries add ``finetune``); ``get_config`` names and locks it, so overriding a key that does not
exist is an error that names the closest keys. Pretraining entries live in base.py, the paper's ablations (one
override on a base entry each) in ablations.py, fine-tuning entries in downstream.py.
"""

import os
import re

from experiments import ablations
from experiments import base
from experiments import downstream

DEFAULT = 'crate_mae_mnist'
_ENTRIES = {
    fn.__name__: fn
    for fn in (
        base.crate_mae_tiny,
        base.crate_mae_small,
        base.crate_mae_base,
        base.crate_mae_large,
        base.mae_vit_base,
        base.fair_mae_base,
        base.crate_mae_mnist,
        base.crate_mae_mnist_long,
        base.crate_mae_mnist_rawpix,
        base.crate_mae_test,
        base.crate_alpha_mae_tiny,
        base.crate_alpha_mae_small,
        base.crate_alpha_mae_base,
        base.crate_alpha_mae_mnist,
        base.tost_mae_tiny,
        base.tost_mae_small,
        base.tost_mae_base,
        base.tost_mae_mnist,
        downstream.finetune_cifar10,
        downstream.finetune_cifar100,
        downstream.finetune_oxford_flowers102,
        downstream.finetune_oxford_iiit_pet,
        downstream.finetune_mnist,
        downstream.finetune_skimage_crops,
    )
}
_ENTRIES.update(ablations.entries())
declared_overrides = ablations.declared_overrides


def names():
    return sorted(_ENTRIES)


def describe(name):
    """The first line of an entry's docstring."""
    return (_ENTRIES[name].__doc__ or '').strip().splitlines()[0]


def get_config(name=None):
    """The locked config of a registered entry (``--config=experiments/registry.py:NAME`` calls this)."""
    name = name or DEFAULT
    if name not in _ENTRIES:
        raise ValueError(
            f'Unknown experiment {name!r}. Registered experiments: {", ".join(names())}. '
            '(`python -m launch.list` describes each.)'
        )
    config = _ENTRIES[name]()
    config.name = name
    config.lock()
    return config


def where(name):
    """'experiments/FILE.py:LINE' of the ``def NAME(`` or the quoted ``'NAME'`` that defines an entry."""
    if name not in _ENTRIES:
        raise ValueError(f'Unknown experiment {name!r}.')
    folder = os.path.dirname(os.path.abspath(__file__))
    pattern = re.compile(rf"^def {name}\(|'{name}'")
    for module in (base, downstream, ablations):
        path = module.__file__
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if pattern.search(line):
                    return f'{os.path.basename(folder)}/{os.path.basename(path)}:{number}'
    raise LookupError(f'{name!r} is registered but defined nowhere a reader can find; name it in experiments/.')


def check_remote_run(config, num_devices: int = 1, process_count: int = 1):
    """Checks, on this machine, a config that ``launch.train`` will run elsewhere (on a pod's hosts, on a cluster's
    nodes) under its registry name: that it is a registered experiment, and that it passes the checks launch.train
    makes before compiling, for ``num_devices`` devices in ``process_count`` processes where the caller knows them
    (a Slurm job does; a pod's slice size is not known to ``run``). Raises ValueError naming the problem."""
    from cratemae import sharding  # pylint: disable=import-outside-toplevel
    from cratemae import train  # pylint: disable=import-outside-toplevel

    if config.name not in names():  # the remote command names the registry's entry of that name
        raise ValueError(f'--config takes a registered experiment (--config=NAME); {config.name!r} is not one.')
    data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices)
    train.validate_config(config, data * fsdp, process_count)
