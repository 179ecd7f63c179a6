"""Test session set-up: 8 fake CPU devices (so sharding code is exercised) and a persistent compilation cache."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ.get('CRATEMAE_TEST_JAX_CACHE', '/tmp/cratemae_jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
