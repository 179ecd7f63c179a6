"""No silent wrong results (issue 22): features that know their data, accuracies only on held-out images, one decoder
for every image file, evaluation through the worker pipeline."""

import dataclasses
import io
import json
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

import experiments
from cratemae import data
from cratemae.data import splits
from cratemae.data import tfds_writer
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from launch import cli
from launch import probe as probe_cli


def _png(value, size=(28, 28), mode='L'):
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(0, 20, size[::-1]), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format='PNG')
    return buf.getvalue()


def _labelled_folder(root, per_class=6, classes=('a', 'b')):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f'{i}.png').write_bytes(_png(40 + 120 * c + i))
    return root


@pytest.fixture(scope='module')
def model_config():
    return experiments.get_config('crate_mae_test').model


def _folder_cfg(folder, **kw):
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=str(folder), image_size=28, channels=1, augment='none', num_workers=0)
    cfg.update(kw)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# 1. The feature cache knows everything that determines the features.


@pytest.mark.slow  # 13 feature extractions (~10 s)
def test_every_input_of_the_features_changes_the_cache(tmp_path, model_config, monkeypatch):
    """Each change below is a cache miss (the encoder runs again); repeating a probe is a hit that says when its
    features were computed. Today's key missed the folder's contents, the tfds version and the label key."""
    computed = []
    real = features.extract
    monkeypatch.setattr(features, 'extract', lambda *a, **k: computed.append(1) or real(*a, **k))
    folder = _labelled_folder(tmp_path / 'images')
    weights = checkpoints.random_init(model_config, seed=0)
    cache = tmp_path / 'cache'

    def probe(ckpt=weights, cfg=None, split='train', feature='pixels'):  # pixels: no encoder to compile
        before = len(computed)
        feats = features.split_features(ckpt, cfg or _folder_cfg(folder), split, feature, cache_dir=cache)
        return feats, len(computed) > before

    first, ran = probe()
    assert ran and not first.cached
    again, ran = probe()
    assert not ran and again.cached
    np.testing.assert_array_equal(again.x, first.x)

    os.remove(folder / 'a' / '0.png')  # an image removed: 11 examples, not the cached 12
    feats, ran = probe()
    assert ran and len(feats.y) == 11
    assert first.computed_at and again.computed_at == first.computed_at  # a hit says when it was computed
    (folder / 'a' / '1.png').rename(folder / 'b' / 'moved.png')  # relabelled
    feats, ran = probe()
    assert ran and (feats.y == 1).sum() == 7
    (folder / 'a' / '9.png').write_bytes(_png(3))  # added
    assert probe()[1]
    later = time.time() + 5  # rewritten in place, same name and size: the modification time tells
    os.utime(folder / 'a' / '9.png', (later, later))
    assert probe()[1]
    assert probe(cfg=_folder_cfg(folder, eval_crop_pct=0.5))[1]  # preprocessing
    assert probe(cfg=_folder_cfg(folder, normalize='none'))[1]
    assert probe(split='train[:50%]')[1]  # split
    assert probe(feature='cls')[1]  # feature type
    assert not probe(feature='cls')[1]
    assert probe(ckpt=checkpoints.random_init(model_config, seed=1), feature='cls')[1]  # other weights
    leaves, tree = jax.tree.flatten(weights.params)  # same architecture, path and seed; one weight changed
    leaves[0] = np.asarray(leaves[0]) + 1.0
    assert probe(ckpt=dataclasses.replace(weights, params=jax.tree.unflatten(tree, leaves)), feature='cls')[1]


def test_tfds_version_and_keys_are_part_of_the_cache_key(tmp_path, model_config):
    payloads = [(_png(10 * i), i % 2) for i in range(4)]
    tfds_writer.write_dataset(tmp_path, 'trust_images', {'train': payloads}, 2, version='1.0.0')
    cfg = data.default_data_config()
    cfg.update(name='tfds:trust_images', data_dir=str(tmp_path), image_size=28, channels=1, augment='none')
    weights = checkpoints.random_init(model_config, seed=0)
    key = features.cache_key(weights, cfg, 'train', 'cls')
    assert features.cache_key(weights, cfg, 'train', 'cls') == key
    other_label = data.data_config_from(cfg.to_dict())
    other_label.label_key = 'image'  # any other feature names other labels
    assert features.cache_key(weights, other_label, 'train', 'cls') != key
    tfds_writer.write_dataset(tmp_path, 'trust_images', {'train': payloads[:3]}, 2, version='1.0.1')
    assert features.cache_key(weights, cfg, 'train', 'cls') != key  # tfds:NAME resolves to the newest version


# --------------------------------------------------------------------------------------------------------------
# 2. Held-out data for every accuracy; tfds slices on every source.


def test_slices_select_the_same_examples_on_every_source(tmp_path):
    """train[:90%] / train[90%:] are disjoint and cover the split, on embedded, folder and tfds sources alike, with
    tfds's own bounds."""
    mnist = data.default_data_config()
    mnist.update(image_size=28, augment='none')
    folder_cfg = _folder_cfg(_labelled_folder(tmp_path / 'f', per_class=10))
    payloads = [(_png(3 * i), i % 2) for i in range(30)]
    tfds_writer.write_dataset(tmp_path / 'tfds', 'sliced_images', {'train': payloads}, 2)
    tfds_cfg = data.default_data_config()
    tfds_cfg.update(name='tfds:sliced_images', data_dir=str(tmp_path / 'tfds'), image_size=28, channels=1)
    for cfg, n in ((mnist, 4500), (folder_cfg, 20), (tfds_cfg, 30)):
        dataset = data.resolve(cfg)
        head, _ = dataset.open('train[:90%]')
        tail, _ = dataset.open('train[90%:]')
        first, _ = dataset.open('train[:7]')
        assert (len(head), len(tail), len(first)) == (round(0.9 * n), n - round(0.9 * n), 7), cfg.name
        whole, _ = dataset.open('train')
        keys = lambda src: [bytes(np.asarray(src[i][0]).tobytes()) for i in range(len(src))]  # noqa: E731
        assert sorted(keys(head) + keys(tail)) == sorted(keys(whole))
        assert not set(keys(head)) & set(keys(tail))
    folder_tail = data.resolve(folder_cfg).open('train[90%:]')[0]
    assert set(folder_tail.labels.tolist()) == {0, 1}  # a fixed shuffle: the tail of a class-sorted folder mixes both
    assert splits.disjoint('train[:90%]', 'train[90%:]') and not splits.disjoint('train', 'train[90%:]')
    assert not splits.disjoint('train[:50]', 'train[40%:]')  # other units: not provably disjoint, refused
    with pytest.raises(ValueError, match='not a split name with an optional tfds slice'):
        data.resolve(mnist).open('train[:x]')


def test_probe_of_a_flat_folder_refuses_to_test_on_its_training_images(tmp_path, model_config, capsys):
    """The reported case: a flat labelled folder probed without split flags printed '160 train / 160 test'."""
    folder = _labelled_folder(tmp_path / 'flat', per_class=10)
    export_dir = tmp_path / 'weights'
    from cratemae import export  # pylint: disable=import-outside-toplevel

    ckpt = dataclasses.replace(checkpoints.random_init(model_config), data_config=_folder_cfg(folder))
    path = export.export_checkpoint(ckpt, 'safetensors', export_dir / 'enc.safetensors', encoder_only=True)
    args = [f'--checkpoint={path}', f'--out={tmp_path / "out"}', f'--cache_dir={tmp_path / "c"}', '--methods=knn']
    args.append('--feature=pixels')  # no encoder to compile: the splits are what is tested
    assert cli.run(probe_cli.main, probe_cli.FLAGS, args) == 2
    err = capsys.readouterr().err
    assert 'training images' in err and '--holdout' in err and '--split_eval' in err
    assert cli.run(probe_cli.main, probe_cli.FLAGS, args + ['--holdout=25']) == 0
    out = capsys.readouterr().out
    assert 'held out the last 25% of train' in out and '15 train / 5 test' in out
    record = json.loads((tmp_path / 'out' / 'probe_image_folder_pixels.json').read_text())
    assert record['splits'] == ['train[:75%]', 'train[75%:]']
    assert cli.run(probe_cli.main, probe_cli.FLAGS, args + ['--holdout=25']) == 0
    assert 'cached features computed' in capsys.readouterr().out
    assert cli.run(probe_cli.main, probe_cli.FLAGS, args + ['--eval_on_train']) == 0
    assert 'overlaps the training split' in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# 3. One decoder for every image file.


def _files(tmp_path):
    """A 16-bit grey PNG, a JPEG whose EXIF says 'rotate 90 degrees', and a non-square PNG with stripes."""
    wide = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 40 + 20000).astype(np.uint16)
    sixteen = tmp_path / 'sixteen.png'
    Image.fromarray(wide).save(sixteen)  # mode I;16: values 20000..51000, PIL's convert('L') clips them all to 255
    rotated = tmp_path / 'rotated.jpg'
    photo = np.zeros((28, 40, 3), np.uint8)
    photo[:, :20] = 230  # bright left half: after the EXIF rotation it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(rotated, exif=exif, quality=95)
    stripes = tmp_path / 'stripes.png'
    wide_image = np.zeros((30, 50), np.uint8)
    wide_image[:, :10] = 255  # outside the centre square: a squash shows it, the eval crop does not
    Image.fromarray(wide_image).save(stripes)
    return sixteen, rotated, stripes


def test_inspect_image_files_go_through_the_shared_decoder_and_the_eval_crop(tmp_path, model_config):
    from cratemae import inspection  # pylint: disable=import-outside-toplevel
    from cratemae.data import augment  # pylint: disable=import-outside-toplevel
    from cratemae.data import decode  # pylint: disable=import-outside-toplevel

    paths = _files(tmp_path)
    loaded = inspection.random_init(model_config, 0)
    options = inspection.Options(checkpoint='-', out='-', image_files=tuple(map(str, paths)), batch=8)
    notes = []
    _, shown, mean, std = inspection.load_images(options, loaded, notes)
    pixels = np.rint((shown * np.asarray(std) + np.asarray(mean)) * 255).astype(int)[..., 0]
    for path, got in zip(paths, pixels):
        want = decode.decode_crop(path.read_bytes(), lambda h, w: augment.center_box(h, w, 1.0), 28, 1)[..., 0]
        np.testing.assert_allclose(got, want, atol=1, err_msg=str(path))
    assert pixels[0].max() < 255 and abs(int(pixels[0][0, 0]) - (20000 >> 8)) <= 1  # 16-bit: top 8 bits, not clipped
    assert pixels[1][:10].mean() > 200 and pixels[1][-10:].mean() < 30  # EXIF orientation applied
    assert pixels[2].max() < 30  # the bright stripe lies outside the centre crop: a squash shows it as 255
    assert any('centre crop' in n for n in notes)


# --------------------------------------------------------------------------------------------------------------
# 4. Evaluation through the worker pipeline; AOT without the data.


def _finetune_folder_config(folder, weights):
    """crate_mae_test's encoder fine-tuned for two steps on an image folder, evaluated at step 2."""
    from experiments import base  # pylint: disable=import-outside-toplevel
    from experiments import downstream  # pylint: disable=import-outside-toplevel

    config = downstream.finetune_config(
        base.crate_mae_test(), 'image_folder', ('train', 'auto'), 24, epochs=1, batch=8, image_size=28
    )
    config.data.update(folder=str(folder), channels=1, num_workers=1, prefetch=1, randaugment=None, hflip=False)
    config.train.update(steps=2, log_every=1, eval_every=2, eval_batch=8)
    config.checkpoint.update(every=2, async_save=False)
    config.finetune.update(checkpoint=str(weights))
    if 'num_classes' in config.finetune:
        config.finetune.num_classes = 2
    return config


@pytest.mark.slow  # fine-tunes for two steps with worker processes (~30 s on 2 busy cores)
def test_finetune_evaluation_decodes_in_the_workers_not_the_trainer(tmp_path, model_config, monkeypatch):
    """Today's evaluation decoded the whole eval split serially in the trainer process."""
    from cratemae import export  # pylint: disable=import-outside-toplevel
    from cratemae.data import decode  # pylint: disable=import-outside-toplevel
    from cratemae.train import finetune  # pylint: disable=import-outside-toplevel

    for split in ('train', 'validation'):
        _labelled_folder(tmp_path / 'images' / split, per_class=8 if split == 'train' else 4)
    weights = export.export_checkpoint(
        checkpoints.random_init(model_config), 'safetensors', tmp_path / 'enc.safetensors', encoder_only=True
    )
    config = _finetune_folder_config(tmp_path / 'images', weights)
    decoded = []
    real = decode.decode_crop
    monkeypatch.setattr(decode, 'decode_crop', lambda *a, **k: decoded.append(1) or real(*a, **k))
    result = finetune.finetune_and_evaluate(config, str(tmp_path / 'run'))
    assert 0.0 <= result['eval/top1'] <= 1.0
    assert decoded == []  # every training and evaluation image was decoded by a worker process


def test_finetune_refuses_to_report_top1_on_its_training_images(tmp_path, model_config):
    """A flat folder has no held-out split: fine-tuning stops before anything is built, unless --holdout."""
    from cratemae.train import finetune  # pylint: disable=import-outside-toplevel

    folder = _labelled_folder(tmp_path / 'flat', per_class=8)
    config = _finetune_folder_config(folder, tmp_path / 'no_weights_needed.safetensors')
    with pytest.raises(ValueError, match='training images.*--holdout.*--eval_on_train'):
        finetune.finetune_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()
    config.finetune.holdout = 25
    assert 'held out the last 25% of train' in finetune.resolve_splits(config)
    assert (config.data.split_train, config.data.split_eval) == ('train[:75%]', 'train[75%:]')
    assert finetune.resolve_splits(config)  # a second call (launch.finetune, then the library) changes nothing
    assert (config.data.split_train, config.data.split_eval) == ('train[:75%]', 'train[75%:]')


def test_aot_of_a_finetune_entry_takes_the_class_count_from_the_config(tmp_path):
    from cratemae.train import tasks  # pylint: disable=import-outside-toplevel

    config = experiments.get_config('finetune_cifar10')
    config.data.data_dir = str(tmp_path)  # nothing prepared there: the data is not read
    assert tasks.for_config(config).num_classes == 10
    config.finetune.num_classes = None
    with pytest.raises(ValueError, match=r'--config\.finetune\.num_classes=N'):
        tasks.for_config(config)
