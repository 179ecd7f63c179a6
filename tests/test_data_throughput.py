"""launch.benchmark_data's library: ImageNet-like JPEGs and one record per mode (tiny sizes: no timing asserted)."""

import io
import json
import math

import numpy as np
from PIL import Image

from cratemae.data import throughput
from launch import benchmark_data
from launch import cli


def test_jpegs_look_like_imagenet_files():
    jpegs = throughput.imagenet_like_jpegs(14)
    sizes = {Image.open(io.BytesIO(b)).size for b, _ in jpegs}
    assert sizes == {(500, 375), (375, 500)}
    mean_kib = np.mean([len(b) for b, _ in jpegs]) / 1024
    assert 85 <= mean_kib <= 140, mean_kib  # ImageNet's average file is ~110 KiB
    assert {label for _, label in jpegs} == set(range(7))


def test_texture_label_is_returned_on_request_and_independent_of_the_photo():
    plain = throughput.imagenet_like_jpegs(21, seed=3)
    labelled = throughput.imagenet_like_jpegs(21, seed=3, with_texture=True)
    assert [(b, label) for b, label, _ in labelled] == plain  # the same images and photo labels
    # every (photo, texture) pair once: a probe of one label learns nothing of the other
    assert sorted((label, texture) for _, label, texture in labelled) == [(p, t) for p in range(7) for t in range(3)]


def test_one_json_line_per_mode_with_rates_and_cores_needed(capsys):
    args = ['--images=8', '--batch=4', '--steps=1', '--size=32', '--workers=0', '--reencode=64:80', '--resize=torch']
    assert cli.run(benchmark_data.main, benchmark_data.FLAGS, args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r['mode'] for r in records] == ['folder', 'tfds_jpeg', 'folder_s64_q80']
    for r in records:
        per_core = r['images_per_cpu_second']
        assert per_core > 0 and r['decode_augment_per_cpu_second'] > 0 and r['images_per_s']['0'] > 0
        assert r['uint8_batches'] is True and r['workers'] == [0]  # what training reads, by default
        assert r['resize'] == 'torch'
        assert r['cores_needed']['H100/H200 GPU'] == math.ceil(4600 / per_core)
        assert set(r['cores_needed']) == set(throughput.TARGETS)
        assert r['images'] == 8 and r['size'] == 32 and len(r['load_before']) == 3
    folder, tfds_jpeg, small = (r['bytes_per_image'] for r in records)
    assert 85 * 1024 <= folder <= 140 * 1024 and tfds_jpeg >= folder  # the shards hold the same bytes, and an index
    assert small < folder / 10  # 64 px short side at quality 80


def test_a_named_dataset_and_float32_batches(tmp_path, capsys):
    for i, (payload, label) in enumerate(throughput.imagenet_like_jpegs(4)):
        (tmp_path / f'{i}.jpg').write_bytes(payload)
    args = ['--dataset=image_folder', f'--folder={tmp_path}', '--batch=2', '--steps=1', '--size=32', '--workers=0']
    assert cli.run(benchmark_data.main, benchmark_data.FLAGS, args + ['--nouint8']) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record['mode'] == 'dataset' and record['name'] == 'image_folder' and record['uint8_batches'] is False
    assert record['bytes_per_image'] == round(np.mean([p.stat().st_size for p in tmp_path.iterdir()]))
    assert cli.run(benchmark_data.main, benchmark_data.FLAGS, ['--reencode=320']) == 2
    assert 'SHORT_SIDE:QUALITY' in capsys.readouterr().err
