"""The tasks the engine runs, by name, and the program of a config whichever task it is (for AOT and benchmarks)."""

from cratemae.train import engine
from cratemae.train import finetune
from cratemae.train import pretrain

TASKS = {'pretrain': pretrain.Pretrain, 'finetune': finetune.Finetune}


def task_name(config) -> str:
    """'finetune' for a fine-tuning entry (it has a config.finetune block), else 'pretrain'."""
    return 'finetune' if 'finetune' in config else 'pretrain'


def for_config(config, data_info=None):
    """The task of ``config``. Fine-tuning needs the number of classes: from ``data_info`` when the data was read,
    else from ``config.finetune.num_classes`` (AOT compiles and benchmarks read no data)."""
    name = task_name(config)
    if name == 'finetune' and data_info is None:
        return TASKS[name](config, num_classes=finetune.config_num_classes(config))
    return TASKS[name](config, data_info)


def build_program(config, mesh, data_info=None) -> engine.Program:
    """The jitted program the engine would run for ``config`` on ``mesh`` (the same code path, no data read for
    pretraining)."""
    return engine.build_program(config, mesh, for_config(config, data_info))
