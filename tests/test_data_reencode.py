"""Re-encoding a dataset for speed (`cratemae/data/reencode.py`, `launch.prepare_data --reencode_to`).

Every source is built here from generated images: an image folder with split and class subfolders, and a tfds
dataset written with `tfds_writer` (no TensorFlow, no download).
"""

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from cratemae import data
from cratemae.data import decode
from cratemae.data import folder as folder_lib
from cratemae.data import reencode
from cratemae.data import tfds_source
from cratemae.data import tfds_writer
from launch import cli
from launch import prepare_data


def _jpeg(rng, h, w, grey=False, **kw):
    pixels = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, 'JPEG', quality=90, **kw)
    return buf.getvalue()


def _tree_digest(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, 'rb') as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def split_folder(tmp_path):
    """train/{cat,dog,empty} + validation/{cat,dog,empty}; mixed sizes and modes; one undecodable file."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'src'
    for split, n in (('train', 3), ('validation', 2)):
        for c in ('cat', 'dog', 'empty'):
            (root / split / c).mkdir(parents=True)
        for i in range(n):
            (root / split / 'cat' / f'{i}.jpg').write_bytes(_jpeg(rng, 90, 120))  # large: shrunk
            (root / split / 'dog' / f'{i}.JPEG').write_bytes(_jpeg(rng, 30, 40, grey=True))  # small JPEG: copied
            Image.fromarray(rng.integers(0, 256, (70, 50, 4), dtype=np.uint8)).save(root / split / 'dog' / f'p{i}.png')
    (root / 'train' / 'cat' / 'broken.jpg').write_bytes(b'not a jpeg at all' * 4)
    return root


def _stored_name(rel):
    """A JPEG keeps its name with the extension .jpg; any other file gets .jpg appended (no two can collide)."""
    stem, ext = os.path.splitext(rel)
    return stem + '.jpg' if ext.lower() in ('.jpg', '.jpeg') else rel + '.jpg'


def _labels_by_file(folder, split):
    """{path relative to the split folder: label} as the folder loader reads them."""
    src = folder_lib.FolderSource(os.path.join(folder, split))
    return {os.path.relpath(p, os.path.join(folder, split)): int(l) for p, l in zip(src.paths, src.labels)}


def test_bound_sizes():
    b = reencode.Bound(short_side=32, max_side=None, quality=90)
    assert b.size(120, 90) == (43, 32) and b.size(90, 120) == (32, 43)
    assert b.size(20, 10) == (20, 10)  # never enlarged
    assert reencode.Bound(None, 50, 90).size(120, 90) == (50, 38)
    assert reencode.Bound(32, 40, 90).size(200, 100) == (40, 20)  # the tighter bound wins
    with pytest.raises(ValueError, match='give a size bound'):
        reencode.Bound(None, None, 90).check()
    with pytest.raises(ValueError, match='quality'):
        reencode.Bound(32, None, 101).check()


def test_folder_copy_keeps_splits_labels_and_leaves_the_source_alone(split_folder, tmp_path):
    before = _tree_digest(split_folder)
    out = tmp_path / 'out'
    record = reencode.reencode(str(out), reencode.Bound(32, None, 85), folder=str(split_folder), workers=0)
    assert _tree_digest(split_folder) == before  # the source is only read
    assert record['complete'] and record['images'] == 15 and record['left_out'] == 1
    assert sorted(os.listdir(out)) == ['reencode.json', 'train', 'validation']
    assert sorted(os.listdir(out / 'train')) == ['cat', 'dog', 'empty']  # the empty class kept: labels keep numbers
    for split in ('train', 'validation'):
        got = _labels_by_file(str(out), split)
        want = _labels_by_file(str(split_folder), split)
        assert got == {_stored_name(k): v for k, v in want.items()}
    for p in (out / 'train' / 'cat').iterdir():
        with Image.open(p) as im:
            assert im.format == 'JPEG' and min(im.size) == 32 and im.size == (43, 32) and im.mode == 'RGB'
    small_src = (split_folder / 'train' / 'dog' / '0.JPEG').read_bytes()
    assert (out / 'train' / 'dog' / '0.jpg').read_bytes() == small_src  # within the bound: copied, no second loss
    with Image.open(out / 'train' / 'dog' / 'p0.png.jpg') as im:
        assert im.mode == 'RGB' and im.size == (32, 45)  # RGBA PNG: alpha dropped, shrunk
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=str(out), image_size=16, channels=3, prefetch=0)
    pipe = data.make_pipeline(cfg, 'auto', 4, seed=0, train=False)
    assert pipe.split == 'validation' and pipe.info.num_classes == 3 and pipe.info.num_examples == 6


def test_tfds_copy_keeps_labels_per_record(tmp_path):
    rng = np.random.default_rng(1)
    splits = {
        'train': [(_jpeg(rng, 64, 48 + 8 * i), i % 3) for i in range(7)],
        'test': [(_jpeg(rng, 80, 40), 2), (_jpeg(rng, 40, 80, grey=True), 0)],
    }
    tfds_writer.write_dataset(tmp_path / 'tfds', 'small_jpegs', splits, num_classes=3)
    out = tmp_path / 'out'
    record = reencode.reencode(
        str(out), reencode.Bound(24, None, 90), tfds_name='tfds:small_jpegs', data_dir=str(tmp_path / 'tfds'), workers=2
    )
    assert record['images'] == 9 and record['this_run']['workers'] == 2
    for split, items in splits.items():
        source, _ = tfds_source.PreparedDataset('tfds:small_jpegs', str(tmp_path / 'tfds')).open(split)
        got = _labels_by_file(str(out), split)
        assert len(got) == len(items) == len(source)
        for rel, label in got.items():
            payload, want = source[int(os.path.splitext(os.path.basename(rel))[0])]  # named by record index
            assert label == want, (split, rel)
            with Image.open(out / split / rel) as im:
                assert min(im.size) == 24
                full = decode.decode(payload, 3 if im.mode == 'RGB' else 1)
                assert im.size == reencode.Bound(24, None, 90).size(full.shape[1], full.shape[0])
    with pytest.raises(ValueError, match="has splits \\['test', 'train'\\]|has splits \\['train', 'test'\\]"):
        reencode.reencode(
            str(tmp_path / 'o2'), reencode.Bound(), tfds_name='tfds:small_jpegs', data_dir=str(tmp_path / 'tfds'),
            splits=['extra'],
        )  # fmt: skip


def test_interrupted_run_resumes_writing_only_what_is_missing(split_folder, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    real = reencode.reencode_image
    calls = []

    def dies_after_four(payload, bound):
        if len(calls) == 4:
            raise KeyboardInterrupt  # a ^C in the middle of the copy
        encoded = real(payload, bound)
        calls.append(1)
        return encoded

    monkeypatch.setattr(reencode, 'reencode_image', dies_after_four)
    with pytest.raises(KeyboardInterrupt):
        reencode.reencode(str(out), reencode.Bound(32, None, 85), folder=str(split_folder), workers=0)
    first = {k: v for k, v in _tree_digest(out).items() if k != 'reencode.json'}
    assert len(first) == 4
    assert json.loads((out / 'reencode.json').read_text())['complete'] is False
    (out / 'train' / 'cat' / '0.jpg.123.partial').write_bytes(b'half a file')  # what a killed writer leaves
    stamps = {k: os.stat(out / k).st_mtime_ns for k in first}
    monkeypatch.setattr(reencode, 'reencode_image', real)
    record = reencode.reencode(str(out), reencode.Bound(32, None, 85), folder=str(split_folder), workers=0)
    assert record['complete'] and record['this_run']['written'] == 11 and record['this_run']['already_there'] == 4
    assert {k: os.stat(out / k).st_mtime_ns for k in first} == stamps  # not rewritten
    assert not [k for k in _tree_digest(out) if k.endswith('.partial')]
    fresh = tmp_path / 'fresh'
    reencode.reencode(str(fresh), reencode.Bound(32, None, 85), folder=str(split_folder), workers=0)
    resumed, whole = _tree_digest(out), _tree_digest(fresh)
    resumed.pop('reencode.json'), whole.pop('reencode.json')
    assert resumed == whole  # the resumed copy is the uninterrupted one
    with pytest.raises(ValueError, match='other settings'):
        reencode.reencode(str(out), reencode.Bound(32, None, 70), folder=str(split_folder), workers=0)


def test_the_source_is_never_the_output(split_folder, tmp_path):
    for out in (split_folder, split_folder / 'train' / 'copy', tmp_path):
        with pytest.raises(ValueError, match='the source is only read'):
            reencode.reencode(str(out), reencode.Bound(), folder=str(split_folder), workers=0)
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'thesis.txt').write_text('mine')
    with pytest.raises(ValueError, match='not a re-encoded copy'):
        reencode.reencode(str(tmp_path / 'busy'), reencode.Bound(), folder=str(split_folder), workers=0)


def test_prepare_data_reencode_flags(split_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    argv = ['image_folder', f'--folder={split_folder}', f'--reencode_to={out}', '--short_side=32']
    assert cli.run(prepare_data.main, prepare_data.FLAGS, argv + ['--quality=80', '--workers=0']) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed.splitlines()[0])['quality'] == 80
    assert f'--config.data.folder={out}' in printed
    assert (
        cli.run(prepare_data.main, prepare_data.FLAGS, argv[:2] + [f'--reencode_to={tmp_path / "o"}', '--workers=0'])
        == 0
    )
    assert cli.run(prepare_data.main, prepare_data.FLAGS, argv[:1] + [f'--reencode_to={tmp_path / "x"}']) == 2
    assert '--folder' in capsys.readouterr().err
    missing = ['tfds:nothing_here', f'--data_dir={tmp_path}', f'--reencode_to={tmp_path / "y"}']
    assert cli.run(prepare_data.main, prepare_data.FLAGS, missing) == 2
    assert 'nothing_here' in capsys.readouterr().err
