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


def test_one_json_line_per_mode_with_rates_and_cores_needed(capsys):
    assert (
        cli.run(
            benchmark_data.main,
            benchmark_data.FLAGS,
            ['--images=8', '--batch=4', '--steps=1', '--size=32', '--workers=0'],
        )
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r['mode'] for r in records] == ['folder', 'tfds_jpeg']
    for r in records:
        per_core = r['images_per_cpu_second']
        assert per_core > 0 and r['decode_augment_per_cpu_second'] > 0 and r['images_per_s']['0'] > 0
        assert r['cores_needed']['H100/H200 GPU'] == math.ceil(4600 / per_core)
        assert set(r['cores_needed']) == set(throughput.TARGETS)
        assert r['images'] == 8 and r['size'] == 32 and len(r['load_before']) == 3
