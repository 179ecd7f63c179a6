"""The tasks the engine runs, by name, and the program of a config whichever task it is (for AOT and benchmarks)."""

from cratemae import data
from cratemae.train import engine
from cratemae.train import finetune
from cratemae.train import pretrain

TASKS = {'pretrain': pretrain.Pretrain, 'finetune': finetune.Finetune}


def task_name(config) -> str:
    """'finetune' for a fine-tuning entry (it has a config.finetune block), else 'pretrain'."""
    return 'finetune' if 'finetune' in config else 'pretrain'


def for_config(config, data_info=None):
    """The task of ``config``. Fine-tuning needs the number of classes: from ``data_info``, else from the config's
    training split (the data must then be readable here)."""
    name = task_name(config)
    if name == 'finetune' and data_info is None:
        data_info = data.make_pipeline(
            config.data,
            split=config.data.split_train,
            global_batch=config.train.global_batch,
            seed=config.seed,
            train=True,
        ).info
    return TASKS[name](config, data_info)


def build_program(config, mesh, data_info=None) -> engine.Program:
    """The jitted program the engine would run for ``config`` on ``mesh`` (the same code path, no data read for
    pretraining)."""
    return engine.build_program(config, mesh, for_config(config, data_info))
