"""uint8 batches normalised on the devices, and device prefetch (8 fake CPU devices, see conftest)."""

import os

import jax
import numpy as np
import pytest

from cratemae import data
from cratemae import sharding
from cratemae.data import device


@pytest.fixture(scope='module', autouse=True)
def cache(tmp_path_factory):
    old = os.environ.get('CRATEMAE_CACHE')
    os.environ['CRATEMAE_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    yield
    if old is None:
        del os.environ['CRATEMAE_CACHE']
    else:
        os.environ['CRATEMAE_CACHE'] = old


def crops_cfg(**kw):
    cfg = data.default_data_config()
    cfg.update(dict(name='skimage_crops', image_size=32, channels=3, prefetch=0), **kw)
    return cfg


@pytest.mark.parametrize('train', [True, False])
def test_uint8_batch_normalised_on_device_equals_the_host_batch(train):
    host = data.make_pipeline(crops_cfg(), 'train' if train else 'test', 16, seed=1, train=train)
    u8 = data.make_pipeline(crops_cfg(), 'train' if train else 'test', 16, seed=1, train=train, uint8=True)
    norm = jax.jit(lambda x: device.normalize(x, host.info.mean, host.info.std))
    for step in (0, 3):
        want, got = host.batch(step), u8.batch(step)
        assert got['image'].dtype == np.uint8 and got['image'].nbytes * 4 == want['image'].nbytes
        np.testing.assert_array_equal(got['label'], want['label'])
        on_device = np.asarray(norm(got['image']))
        assert on_device.dtype == np.float32
        # float32 rounding: the host rounds after the multiply and after the add, XLA may fuse them (one rounding).
        np.testing.assert_allclose(
            on_device, want['image'], rtol=0, atol=4 * float(np.spacing(np.float32(np.abs(want['image']).max())))
        )
        # and both are the equation, computed in float64 from the uint8 pixels
        ref = (got['image'] / 255.0 - np.array(host.info.mean)) / np.array(host.info.std)
        np.testing.assert_allclose(on_device, ref, rtol=1e-6, atol=1e-6)


def test_device_prefetch_keeps_two_batches_in_flight_sharded_like_the_batch():
    mesh = sharding.make_mesh()
    pulled = []
    pipe = data.make_pipeline(crops_cfg(), 'train', 16, seed=0, uint8=True)

    def host_batches():
        for step in range(5):
            pulled.append(step)
            yield step, pipe.batch(step)

    out = device.prefetch(host_batches(), mesh, size=2)
    for k in range(5):
        step, batch = next(out)
        assert step == k and len(pulled) == min(5, k + 3)  # the current one + 2 ahead
        assert batch['image'].sharding == sharding.batch_sharding(mesh)
        assert len(batch['image'].sharding.device_set) == len(jax.devices())
        np.testing.assert_array_equal(np.asarray(batch['image']), pipe.batch(k)['image'])
    assert next(out, None) is None
