"""Bad inputs to the model fail with a ValueError naming the expected shape or dtype, before the layers trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from cratemae import models


@pytest.fixture(scope='module')
def model_and_params():
    model = models.build(experiments.get_config('crate_mae_test').model)
    images = jnp.zeros((2, 28, 28, 1))
    params = jax.jit(lambda x: model.init({'params': jax.random.key(0), 'masking': jax.random.key(1)}, x))(images)
    return model, params


@pytest.mark.parametrize(
    'shape,message',
    [
        ((2, 32, 32, 1), r'\(batch, 28, 28, 1\)'),
        ((2, 28, 28, 3), r'\(batch, 28, 28, 1\)'),
        ((28, 28, 1), r'got \(28, 28, 1\)'),
    ],
)
def test_wrong_image_shape_names_the_expected_shape(model_and_params, shape, message):
    model, params = model_and_params
    with pytest.raises(ValueError, match=message):
        model.apply(params, jnp.zeros(shape), rngs={'masking': jax.random.key(0)})


def test_integer_images_are_refused_with_the_fix(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match='floating point.*uint8'):
        model.apply(params, np.zeros((2, 28, 28, 1), np.uint8), rngs={'masking': jax.random.key(0)})


def test_noise_of_the_wrong_shape_names_the_expected_shape(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match=r'noise must have shape \(batch, num_patches\) = \(2, 16\)'):
        model.apply(params, jnp.zeros((2, 28, 28, 1)), noise=jnp.zeros((2, 17)))


@pytest.mark.parametrize('ratio', [0.0, 1.0, 0.97])
def test_mask_ratio_override_that_keeps_nothing_or_masks_nothing_is_refused(model_and_params, ratio):
    model, params = model_and_params
    with pytest.raises(ValueError, match='mask_ratio'):
        model.apply(params, jnp.zeros((2, 28, 28, 1)), mask_ratio=ratio, rngs={'masking': jax.random.key(0)})


def test_encode_checks_images_too(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match=r'\(batch, 28, 28, 1\)'):
        model.apply(params, jnp.zeros((2, 14, 14, 1)), method=model.encode)
