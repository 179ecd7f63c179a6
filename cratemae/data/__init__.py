"""Datasets and input pipelines for CRATE-MAE.

    from cratemae import data
    cfg = data.default_data_config()
    data.validate_data_config(cfg)
    dataset = data.resolve(cfg)         # spec, classes, channels, statistics: once
    pipe = data.make_pipeline(cfg, split=cfg.split_train, global_batch=256, seed=0,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), train=True,
                              dataset=dataset)
    batch = pipe.batch(step)            # pure function of (seed, step, host)
    for step, batch in pipe.iterate(start_step): ...

Sources: embedded (mnist, skimage_crops, digits if sklearn), tfds array_record
(imagenet2012, cifar10, cifar100, oxford_flowers102, oxford_iiit_pet), and
image_folder. See docs/data.md.
"""

from cratemae.data import workers
from cratemae.data.config import data_config_from
from cratemae.data.config import default_data_config
from cratemae.data.config import validate_data_config
from cratemae.data.pipeline import DataInfo
from cratemae.data.pipeline import Pipeline
from cratemae.data.pipeline import make_pipeline
from cratemae.data.registry import DATASETS
from cratemae.data.registry import DatasetSpec
from cratemae.data.registry import ResolvedDataset
from cratemae.data.registry import dataset_names
from cratemae.data.registry import normalization
from cratemae.data.registry import resolve
from cratemae.data.tfds_source import DatasetNotPreparedError

__all__ = [
    'DATASETS',
    'DataInfo',
    'DatasetNotPreparedError',
    'DatasetSpec',
    'Pipeline',
    'ResolvedDataset',
    'data_config_from',
    'dataset_names',
    'default_data_config',
    'make_pipeline',
    'normalization',
    'resolve',
    'validate_data_config',
]
