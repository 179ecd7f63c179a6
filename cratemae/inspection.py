"""Inspecting checkpoints: the white-box measures per layer and the pictures of them, for ``python -m launch.inspect``.

``inspect(options)`` loads one or more sets of weights (a training workdir, one of its steps, every step, an export,
a random initialisation), measures them on the same unmasked images (``cratemae.diagnostics``), draws
(``cratemae.visualize``) and writes to ``options.out``:

  layerwise.png          the reference's layer-wise figure: R^c at the MSSA input and 1 - zeros of the ISTA output
  mssa_ista.png          R^c at the MSSA input, MSSA output and layer output, and the MSSA and ISTA effects
  mssa_ista_paper.png    the same with the paper-exact variant (only with ``paper``)
  sparsity_inversion.png the l1/l2 sparsity and, with a decoder, the layer-wise inversion error
  attention_layers.png, attention_heads.png, pca.png (and pca_reference.png), reconstructions.png
  whitebox.json          every number, the settings, timings and notes
"""

import dataclasses
import json
import os
import posixpath
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from cratemae import checkpoint as checkpoint_lib
from cratemae import data as data_lib
from cratemae import diagnostics
from cratemae import models
from cratemae import sharding
from cratemae import visualize
from cratemae.data import augment
from cratemae.data import decode
from cratemae.data import device
from cratemae.evaluate import checkpoints

PCA_CHOICES = ('joint', 'reference', 'both')


@dataclasses.dataclass
class Options:
    """What to inspect and how; the flags of ``launch.inspect`` one to one."""

    checkpoint: str
    out: str
    step: int | None = None
    all_steps: bool = False
    compare: tuple = ()
    random_init: bool = False
    dataset: str | None = None
    split: str | None = None
    image_files: tuple = ()
    layers: str = 'all'
    heads: str = 'mean'
    images: int = 4
    image_ids: tuple = ()
    batch: int = 64
    mask_ratios: tuple = (0.5, 0.75, 0.9)
    pca: str = 'both'
    paper: bool = False

    def check(self):
        """Raises ValueError for settings no checkpoint can satisfy (before anything is loaded)."""
        if self.images < 1 or self.batch < 1:
            raise ValueError(f'--images ({self.images}) and --batch ({self.batch}) must be positive.')
        if any(i < 0 for i in self.image_ids):
            raise ValueError(f'--image_ids must be non-negative, got {list(self.image_ids)}.')
        if self.pca not in PCA_CHOICES:
            raise ValueError(f'--pca must be one of {PCA_CHOICES}, got {self.pca!r}.')


@dataclasses.dataclass
class Loaded:
    """One set of weights to inspect."""

    label: str
    step: int | None
    model_config: ml_collections.ConfigDict
    params: dict
    data_config: ml_collections.ConfigDict | None  # None for an export (no training config)
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Loading, through cratemae.evaluate.checkpoints (training workdirs by a params-only Orbax restore, and exports).


def workdir_and_step(path):
    """(workdir, step or None) for a workdir or a <workdir>/checkpoints/<step> directory; (path, None) otherwise.
    Works on local paths and URLs (gs://) alike."""
    path = checkpoints.absolute(path).rstrip('/')
    parent = posixpath.dirname(path)
    if posixpath.basename(path).isdigit() and posixpath.basename(parent) == checkpoint_lib.CKPT_DIR:
        return posixpath.dirname(parent), int(posixpath.basename(path))
    return path, None


def random_init(model_config, seed):
    """The random initialisation of this architecture and seed (``checkpoints.random_init``, the one library
    function for it), with the decoder."""
    ckpt = checkpoints.random_init(model_config, seed, encoder_only=False)
    return Loaded(f'random init (seed {seed})', 0, model_config, ckpt.params, None, seed)


def load(path, step=None, all_steps=False):
    """[Loaded] for a --checkpoint/--compare path: one step (the newest unless ``step``), or every step."""
    workdir, path_step = workdir_and_step(path)
    if not checkpoints.is_workdir(workdir):
        if step is not None or all_steps:
            raise ValueError(f'--step/--all_steps apply to training workdirs only; {path} is one set of weights.')
        label = posixpath.basename(os.path.normpath(path))
        try:
            ckpt = checkpoints.load(path, encoder_only=False)
        except checkpoints.CheckpointError as full_error:  # an encoder-only export: encoder measures still work
            try:
                ckpt = checkpoints.load(path, encoder_only=True)
            except checkpoints.CheckpointError:
                raise full_error from None
        if not diagnostics.has_decoder(ckpt.params):
            label += ' (encoder only)'
        return [Loaded(label, ckpt.step, ckpt.model_config, ckpt.params, ckpt.data_config)]
    seed = int(checkpoints.read_workdir_config(workdir).get('seed', 0))
    name = posixpath.basename(workdir)
    steps = (
        checkpoint_lib.saved_steps(workdir) if all_steps else [path_step if step is None else step]
    )  # None: newest that restores
    loaded = []
    for s in steps:
        ckpt = checkpoints.load(workdir, step=s, encoder_only=False)
        loaded.append(
            Loaded(f'{name} step {ckpt.step}', ckpt.step, ckpt.model_config, ckpt.params, ckpt.data_config, seed)
        )
    if not loaded:
        raise ValueError(f'{workdir} holds no finished checkpoint yet.')
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# Images.


def _data_config(options, loaded, notes):
    model_config, data_config = loaded.model_config, loaded.data_config
    if data_config is None or (options.dataset and options.dataset != data_config.name):
        name = options.dataset or ('mnist' if model_config.channels == 1 else 'skimage_crops')
        if not options.dataset:
            notes.append(f'No --dataset and no training config: using {name!r}.')
        data_config = data_lib.default_data_config()
        data_config.update(name=name, split_eval='validation' if name == 'imagenet2012' else 'test', augment='none')
    data_config = data_lib.data_config_from(data_config.to_dict())  # num_workers takes an int again
    data_config.update(image_size=model_config.image_size, channels=model_config.channels, num_workers=0)
    if options.split:
        data_config.split_eval = options.split
    return data_config


def load_images(options, loaded, notes):
    """(measured, shown, mean, std): the eval split's first ``batch`` images (normalised float32 NHWC) for the
    measures, and for the pictures its first ``images`` (or its ``image_ids``, or the ``image_files``).

    The images come as training reads them: uint8 batches made by the pipeline's workers, copied to the devices
    and normalised there (``device.eval_batches``)."""
    model_config = loaded.model_config
    data_config = _data_config(options, loaded, notes)
    dataset = data_lib.resolve(data_config)
    native_size = dataset.spec.native_size
    if native_size not in (None, model_config.image_size):
        notes.append(
            f'{data_config.name} images are {native_size}px; the eval transform resizes them to the '
            f"model's {model_config.image_size}px."
        )
    pipeline = data_lib.make_pipeline(
        data_config,
        split=data_config.split_eval,
        global_batch=max([options.batch] + [i + 1 for i in options.image_ids]),
        seed=0,
        train=False,
        uint8=True,
        dataset=dataset,
    )
    mean, std = pipeline.info.mean, pipeline.info.std
    ((local, batch),) = device.eval_batches(pipeline, sharding.make_mesh(devices=jax.devices()[:1]), count=1)
    images = np.asarray(device.normalize(batch['image'], mean, std))[np.asarray(local['valid'], bool)]
    if any(i >= len(images) for i in options.image_ids):
        raise ValueError(
            f'--image_ids: the {data_config.split_eval} split has {len(images)} images (valid 0..{len(images) - 1}).'
        )
    shown = images[list(options.image_ids)] if options.image_ids else images[: options.images]
    if options.image_files:
        shown = np.concatenate(
            [read_image(p, model_config, mean, std, dataset.eval_crop_pct, notes) for p in options.image_files]
        )
    return images[: options.batch], shown, mean, std


def read_image(path, model_config, mean, std, crop_pct, notes):
    """One image file as a normalised (1, S, S, C) array, decoded as the pipeline decodes its files (``decode``: EXIF
    orientation, 16-bit grey, palette and CMYK rules) and cut by the eval transform (centre crop ``crop_pct`` of the
    short side, resized to S x S: never squashed)."""
    payload = epath.Path(path).read_bytes()
    size, channels = model_config.image_size, model_config.channels
    try:
        pixels = decode.decode_crop(payload, lambda h, w: augment.center_box(h, w, crop_pct), size, channels)
        height, width = decode.displayed_size(decode.open_image(payload))
    except decode.UndecodableImage as e:
        raise ValueError(f'--image_files: {path}: {e}') from None
    if (height, width) != (size, size):
        notes.append(
            f'{path}: {width}x{height}, centre crop {crop_pct:g} of the short side resized to the model input '
            f'{size}x{size} (the eval transform).'
        )
    return augment.normalize(pixels[None], np.asarray(mean, np.float32), np.asarray(std, np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Pictures.


def parse_indices(text, count, what, allow_mean=False):
    """'0,3' -> [0, 3]; 'all' -> every index; 'mean' (heads) -> the mean over heads. Names the valid range."""
    if text in (None, '', 'all'):
        return list(range(count))
    out = []
    for item in str(text).split(','):
        item = item.strip()
        if allow_mean and item == 'mean':
            out.append('mean')
            continue
        try:
            index = int(item)
        except ValueError:
            raise ValueError(f'--{what}: {item!r} is not an index; use integers in 0..{count - 1}.') from None
        if not 0 <= index < count:
            raise ValueError(
                f'--{what}: index {index} is out of range; this model has {count} {what} (valid 0..{count - 1}).'
            )
        out.append(index)
    return out


def _attention_columns(attention, layers, heads, grid):
    """(n, columns, G, G) maps and labels for every (layer, head) pair; head 'mean' averages the heads."""
    maps, labels = [], []
    for layer in layers:
        for head in heads:
            a = attention[layer].mean(1) if head == 'mean' else attention[layer][:, head]
            maps.append(a.reshape(-1, grid, grid))
            labels.append(f'layer {layer} ' + ('mean' if head == 'mean' else f'head {head}'))
    return np.stack(maps, 1), labels


def measure_pictures(results, options, images_measured):
    """{file name: picture} of the layer-wise measures of every run, [(label, measures)]."""
    about = f'{images_measured} unmasked images, mean +- std over them'
    pictures = {
        'layerwise.png': visualize.layerwise(
            results, title=f'Layer-wise measures as the reference plots them ({about})'
        ),
        'mssa_ista.png': visualize.mssa_ista(results, title=f'What MSSA and ISTA each do to the coding rate ({about})'),
    }
    if options.paper:
        pictures['mssa_ista_paper.png'] = visualize.mssa_ista(
            results, paper=True, title=f'The same, paper-exact coding rate ({about})'
        )
    pictures['sparsity_inversion.png'] = visualize.sparsity_and_inversion(results, title=about)
    return pictures


def checkpoint_pictures(options, loaded, shown, mean, std, skipped):
    """{file name: picture}: attention maps, per-head maps, PCA and reconstructions of one set of weights."""
    cfg = loaded.model_config
    model = models.build(cfg)
    pixels = visualize.to_pixels(shown, mean, std)
    layers = parse_indices(options.layers, cfg.depth, 'layers')
    heads = parse_indices(options.heads or 'mean', cfg.heads, 'heads', allow_mean=True)
    grid = model.grid_size
    projection = jax.jit(
        lambda p, x: diagnostics.unmasked_intermediates(model, p, x, with_decoder=False)['projection']
    )(loaded.params, shown)
    attention = np.asarray(diagnostics.class_attention(projection, cfg.heads))  # (L, n, K, G*G)
    pictures = {}
    maps, labels = _attention_columns(attention, layers, heads, grid)
    pictures['attention_layers.png'] = visualize.overlay_grid(
        pixels, maps, labels, title=f'{loaded.label}: class-token attention to patches'
    )
    last = cfg.depth - 1
    maps, labels = _attention_columns(attention, [last], list(range(cfg.heads)), grid)
    pictures['attention_heads.png'] = visualize.overlay_grid(
        pixels, maps, labels, title=f'{loaded.label}: every head of the last layer'
    )
    features = np.asarray(projection[last])[:, 1:]  # the last layer's "key" features of the patches
    styles = {
        'joint': ('pca.png', 'PC1-PC3, scaled jointly'),
        'reference': ('pca_reference.png', 'PC2-PC4, scaled per image'),
    }
    for style, (name, label) in styles.items():
        if options.pca in (style, 'both'):
            rgb = visualize.pca_rgb(features, style).reshape(len(shown), grid, grid, 3)
            pictures[name] = visualize.pca_grid(
                pixels, rgb, label=label, title=f'{loaded.label}: PCA of layer {last} MSSA-input features'
            )
    if not diagnostics.has_decoder(loaded.params):
        skipped['reconstructions.png'] = 'the checkpoint has no decoder (encoder-only export)'
        return pictures
    grids = []
    noise = jax.random.uniform(jax.random.key(loaded.seed + 1), (len(shown), model.num_patches))
    for ratio in options.mask_ratios:
        out = jax.jit(lambda p, x, n, r=ratio: model.apply({'params': p}, x, noise=n, mask_ratio=r))(
            loaded.params, shown, noise
        )
        image = visualize.reconstruction_grid(
            shown, out['pred'], out['mask'], cfg.patch_size, mean, std, cfg.norm_pix_loss
        )
        grids.append((f'mask ratio {ratio:g} (loss {float(out["loss"]):.3f})', image))
    pictures['reconstructions.png'] = visualize.labelled_grids(
        grids, title=f'{loaded.label}: original | masked | reconstruction | reconstruction + visible'
    )
    return pictures


# ----------------------------------------------------------------------------------------------------------------


def inspect(options):
    """Everything ``launch.inspect`` does; returns the JSON summary it writes to ``options.out``/whitebox.json.

    Raises ValueError (or a CheckpointError, a ValueError) for input that cannot work, before any compile.
    """
    options.check()
    start = time.perf_counter()
    timings, notes, skipped = {}, [], {}
    primary = load(options.checkpoint, options.step, options.all_steps)
    base = primary[-1]  # pictures come from the newest step of --checkpoint
    cfg = base.model_config
    # What cannot work fails before anything else is loaded or compiled.
    diagnostics.check_whitebox(models.build(cfg))
    parse_indices(options.layers, cfg.depth, 'layers')
    parse_indices(options.heads or 'mean', cfg.heads, 'heads', allow_mean=True)
    for ratio in options.mask_ratios:
        models.check_mask_ratio(ratio, (cfg.image_size // cfg.patch_size) ** 2)
    runs = list(primary)
    for path in options.compare:
        runs += load(path)
    for r in runs:
        if (r.model_config.image_size, r.model_config.channels) != (cfg.image_size, cfg.channels):
            raise ValueError(f'{r.label} takes other images than {base.label}; compare runs of one input size.')
    if options.random_init:
        runs.insert(0, random_init(cfg, base.seed))
    timings['load_s'] = time.perf_counter() - start

    t = time.perf_counter()
    images, shown, mean, std = load_images(options, base, notes)
    timings['images_s'] = time.perf_counter() - t

    t = time.perf_counter()
    results = []
    for r in runs:
        m = diagnostics.whitebox_measures(
            models.build(r.model_config), r.params, jnp.asarray(images), paper=options.paper
        )
        if 'inversion_error' not in m and not skipped.get('inversion'):
            skipped['inversion'] = f'{r.label}: no decoder, so no inversion measure'
        results.append((r.label, m))
    timings['measures_s'] = time.perf_counter() - t

    t = time.perf_counter()
    pictures = measure_pictures(results, options, len(images))
    pictures.update(checkpoint_pictures(options, base, shown, mean, std, skipped))
    out = epath.Path(options.out)
    for name, picture in pictures.items():
        visualize.save_png(picture, out / name)
    timings['pictures_s'] = time.perf_counter() - t
    timings['total_s'] = time.perf_counter() - start

    summary = {
        'checkpoint': options.checkpoint,
        'pictures_from': base.label,
        'images_measured': len(images),
        'model': cfg.to_dict(),
        'runs': [
            {'label': label, 'measures': {k: np.asarray(v).tolist() for k, v in sorted(m.items())}}
            for label, m in results
        ],
        'files': list(pictures),
        'skipped': skipped,
        'notes': notes,
        'timings': timings,
        'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
        'options': {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()},
    }
    (out / 'whitebox.json').write_text(json.dumps(summary, indent=1))
    return summary
