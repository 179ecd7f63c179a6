"""cratemae: pretrain, inspect and evaluate CRATE-MAE, the white-box masked autoencoder, in JAX/Flax.

The library never imports ``launch/`` (entry points) or ``experiments/`` (the config registry).
"""

__version__ = '0.1.0'
