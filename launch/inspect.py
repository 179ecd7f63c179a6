"""Look inside a trained CRATE-MAE: layer-wise compression and sparsity, attention maps, PCA of features, reconstructions.

  python -m launch.inspect --checkpoint runs/crate_mae_mnist --out runs/crate_mae_mnist/inspect --random-init
  python -m launch.inspect --checkpoint runs/crate_mae_mnist --all-steps --out DIR          # curves through training
  python -m launch.inspect --checkpoint model.safetensors --dataset mnist --out DIR         # an export
  python -m launch.inspect --checkpoint RUN_A --compare RUN_B/checkpoints/1000 --out DIR    # several runs' curves

--checkpoint is a training workdir (<workdir>/config.json + checkpoints/<step>/; the newest step unless --step),
one step directory <workdir>/checkpoints/<step>, or an exported state dict (.safetensors/.npz/.pth, see
cratemae/export.py). Writes to --out: curves.png (Fig. 4-style compression and sparsity per encoder layer, one line
per checkpoint), attention_layers.png, attention_heads.png, pca.png, reconstructions.png and whitebox.json (every
number, the settings, timings and notes). docs/whitebox.md explains the measures.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from cratemae import checkpoint as checkpoint_lib
from cratemae import data as data_lib
from cratemae import diagnostics
from cratemae import models
from cratemae import visualize
from cratemae.data import registry as data_registry
from cratemae.evaluate import checkpoints
from cratemae.train import step as step_lib


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


def _workdir_and_step(path):
    """(workdir, step or None) for a workdir or a <workdir>/checkpoints/<step> directory; (path, None) otherwise."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.basename(path).isdigit() and os.path.basename(parent) == checkpoint_lib.CKPT_DIR:
        return os.path.dirname(parent), int(os.path.basename(path))
    return path, None


def workdir_steps(workdir):
    """The finished steps of a workdir, ascending (a save in progress is a '<step>.orbax-checkpoint-tmp' folder)."""
    directory = os.path.join(workdir, checkpoint_lib.CKPT_DIR)
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def _as_loaded(ckpt, label, seed=0):
    return Loaded(label, ckpt.step, ckpt.model_config, ckpt.params, ckpt.data_config, seed)


def random_init(model_config, seed, label='random init (step 0)'):
    """The parameters a run with this seed starts from (``step.create_state``), i.e. the run's own step 0.

    (``checkpoints.random_init`` draws another initialisation; this one is the training loop's, so the curves show
    exactly where the run started even when step 0 was not saved.)
    """
    model = models.build(model_config)
    shape = (1, model_config.image_size, model_config.image_size, model_config.channels)
    state = jax.jit(lambda x: step_lib.create_state(model, optax.identity(), x, seed))(jnp.zeros(shape, jnp.float32))
    return Loaded(label, 0, model_config, jax.device_get(state.params), None, seed)


def load(path, step=None, all_steps=False):
    """[Loaded] for a --checkpoint/--compare path: one step (the newest unless ``step``), or every step."""
    workdir, path_step = _workdir_and_step(path)
    if not checkpoints.is_workdir(workdir):
        if step is not None or all_steps:
            raise ValueError(f'--step/--all-steps apply to training workdirs only; {path} is one set of weights.')
        label = os.path.basename(os.path.normpath(path))
        try:
            ckpt = checkpoints.load(path, encoder_only=False)
        except checkpoints.CheckpointError as full_error:  # an encoder-only export: encoder measures still work
            try:
                ckpt = checkpoints.load(path, encoder_only=True)
            except checkpoints.CheckpointError:
                raise full_error from None
        if not diagnostics.has_decoder(ckpt.params):
            label += ' (encoder only)'
        return [_as_loaded(ckpt, label)]
    seed = int(checkpoints.read_workdir_config(workdir).get('seed', 0))
    name = os.path.basename(os.path.normpath(workdir))
    if all_steps:
        steps = workdir_steps(workdir)
    else:
        steps = [path_step if step is None else step]  # None: the newest step that restores
    loaded = []
    for s in steps:
        ckpt = checkpoints.load(workdir, step=s, encoder_only=False)
        loaded.append(_as_loaded(ckpt, f'{name} step {ckpt.step}', seed))
    if not loaded:
        raise ValueError(f'{workdir} holds no finished checkpoint yet.')
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# Images.


def _default_dataset(model_config):
    return 'mnist' if model_config.channels == 1 else 'skimage_crops'


def load_images(args, loaded, notes):
    """(measured, shown, mean, std): the eval split's first --batch images (normalised float32 NHWC) for the measures,
    and for the pictures the first --images of the split (or the --image-ids of it, or the --image-files)."""
    model_config = loaded.model_config
    data_config = loaded.data_config
    if data_config is None or (args.dataset and args.dataset != data_config.name):
        name = args.dataset or _default_dataset(model_config)
        if not args.dataset:
            notes.append(f'No --dataset and no training config: using {name!r}.')
        base = data_lib.default_data_config()
        base.update(name=name, split_eval='validation' if name == 'imagenet2012' else 'test', augment='none')
        data_config = base
    data_config = data_lib.data_config_from(data_config.to_dict())
    data_config.update(image_size=model_config.image_size, channels=model_config.channels, num_workers=0)
    if args.split:
        data_config.split_eval = args.split
    spec = data_registry.get_spec(data_config.name)
    if spec.native_size not in (None, model_config.image_size):
        notes.append(
            f'{data_config.name} images are {spec.native_size}px; the eval transform resizes them to the '
            f"model's {model_config.image_size}px."
        )
    pipeline = data_lib.make_pipeline(
        data_config,
        split=data_config.split_eval,
        global_batch=max([args.batch] + [i + 1 for i in args.image_ids]),
        seed=0,
        train=False,
    )
    batch = pipeline.batch(0)
    images = np.asarray(batch['image'], np.float32)[np.asarray(batch['valid'], bool)]
    mean, std = pipeline.info.mean, pipeline.info.std
    if any(i >= len(images) for i in args.image_ids):
        raise ValueError(
            f'--image-ids: the {data_config.split_eval} split has {len(images)} images (valid 0..{len(images) - 1}).'
        )
    shown = images[args.image_ids] if args.image_ids else images[: args.images]
    images = images[: args.batch]
    if args.image_files:
        shown = np.concatenate([_read_image(p, model_config, mean, std, notes) for p in args.image_files])
    return images, shown, mean, std


def _read_image(path, model_config, mean, std, notes):
    """One image file as a normalised (1, S, S, C) array, resized (with a note) when it is not S x S."""
    image = Image.open(path).convert('L' if model_config.channels == 1 else 'RGB')
    size = model_config.image_size
    if image.size != (size, size):
        notes.append(f'{path}: {image.size[0]}x{image.size[1]} resized to the model input {size}x{size}.')
        image = image.resize((size, size), Image.BICUBIC)
    x = np.asarray(image, np.float32).reshape(size, size, model_config.channels) / 255.0
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))[None]


def _to_uint8(images, mean, std):
    x = np.asarray(images) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Selections.


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


# ----------------------------------------------------------------------------------------------------------------
# The pictures.


def _attention_columns(attention, layers, heads, grid):
    """(n, columns, G, G) maps and labels for every (layer, head) pair; head 'mean' averages the heads."""
    maps, labels = [], []
    for layer in layers:
        for head in heads:
            a = attention[layer].mean(1) if head == 'mean' else attention[layer][:, head]
            maps.append(a.reshape(-1, grid, grid))
            labels.append(f'layer {layer} ' + ('mean' if head == 'mean' else f'head {head}'))
    return np.stack(maps, 1), labels


def make_pictures(args, loaded, shown, mean, std, out_dir, skipped):
    """Attention maps, per-head maps, PCA and reconstructions of the primary checkpoint; returns the paths."""
    cfg = loaded.model_config
    model = models.build(cfg)
    pixels = _to_uint8(shown, mean, std)
    layers = parse_indices(args.layers, cfg.depth, 'layers')
    heads = parse_indices(args.heads or 'mean', cfg.heads, 'heads', allow_mean=True)
    grid = model.grid_size
    projection = jax.jit(
        lambda p, x: diagnostics.unmasked_intermediates(model, p, x, with_decoder=False)['projection']
    )(loaded.params, shown)
    attention = np.asarray(diagnostics.class_attention(projection, cfg.heads))  # (L, n, K, G*G)
    paths = []
    maps, labels = _attention_columns(attention, layers, heads, grid)
    paths.append(
        visualize.overlay_grid(
            pixels,
            maps,
            os.path.join(out_dir, 'attention_layers.png'),
            labels,
            title=f'{loaded.label}: class-token attention to patches',
        )
    )
    last = cfg.depth - 1
    maps, labels = _attention_columns(attention, [last], list(range(cfg.heads)), grid)
    paths.append(
        visualize.overlay_grid(
            pixels,
            maps,
            os.path.join(out_dir, 'attention_heads.png'),
            labels,
            title=f'{loaded.label}: every head of the last layer',
        )
    )
    features = np.asarray(projection[last])[:, 1:]  # the last layer's "key" features of the patches
    rgb = diagnostics.pca_rgb(features).reshape(len(shown), grid, grid, 3)
    paths.append(
        visualize.pca_grid(
            pixels, rgb, os.path.join(out_dir, 'pca.png'), title=f'{loaded.label}: PCA of layer {last} features'
        )
    )
    if not diagnostics.has_decoder(loaded.params):
        skipped['reconstructions.png'] = 'the checkpoint has no decoder (encoder-only export)'
        return paths
    grids = []
    noise = jax.random.uniform(jax.random.key(loaded.seed + 1), (len(shown), model.num_patches))
    for ratio in args.mask_ratios:
        out = jax.jit(lambda p, x, n, r=ratio: model.apply({'params': p}, x, noise=n, mask_ratio=r))(
            loaded.params, shown, noise
        )
        grid_image = diagnostics.reconstruction_grid(
            shown, out['pred'], out['mask'], cfg.patch_size, mean, std, cfg.norm_pix_loss
        )
        grids.append((f'mask ratio {ratio:g} (loss {float(out["loss"]):.3f})', grid_image))
    paths.append(
        visualize.labelled_grids(
            grids,
            os.path.join(out_dir, 'reconstructions.png'),
            title=f'{loaded.label}: original | masked | reconstruction | reconstruction + visible',
        )
    )
    return paths


# ----------------------------------------------------------------------------------------------------------------


def _measures(loaded, images):
    model = models.build(loaded.model_config)
    return diagnostics.whitebox_measures(model, loaded.params, jnp.asarray(images))


def run(args):
    """Everything the command does; returns the JSON summary it writes."""
    start = time.perf_counter()
    timings, notes, skipped = {}, [], {}
    os.makedirs(args.out, exist_ok=True)
    primary = load(args.checkpoint, args.step, args.all_steps)
    base = primary[-1]  # pictures come from the newest step of --checkpoint
    # What cannot work fails before anything else is loaded or compiled.
    diagnostics.check_whitebox(models.build(base.model_config))
    parse_indices(args.layers, base.model_config.depth, 'layers')
    parse_indices(args.heads or 'mean', base.model_config.heads, 'heads', allow_mean=True)
    num_patches = (base.model_config.image_size // base.model_config.patch_size) ** 2
    for ratio in args.mask_ratios:
        models.check_mask_ratio(ratio, num_patches)
    runs = list(primary)
    for path in args.compare or ():
        runs += load(path)
    if args.random_init:
        runs.insert(0, random_init(base.model_config, base.seed))
    timings['load_s'] = time.perf_counter() - start

    t = time.perf_counter()
    images, shown, mean, std = load_images(args, base, notes)
    timings['images_s'] = time.perf_counter() - t

    t = time.perf_counter()
    results = []
    for r in runs:
        if (r.model_config.image_size, r.model_config.channels) != (
            base.model_config.image_size,
            base.model_config.channels,
        ):
            raise ValueError(f'{r.label} takes other images than {base.label}; compare runs of one input size.')
        m = _measures(r, images)
        if 'inversion_error' not in m and not skipped.get('inversion'):
            skipped['inversion'] = f'{r.label}: no decoder, so no inversion measure'
        results.append((r.label, m))
    timings['measures_s'] = time.perf_counter() - t

    t = time.perf_counter()
    paths = [
        visualize.layer_curves(
            results,
            os.path.join(args.out, 'curves.png'),
            title=f'White-box measures on {len(images)} unmasked images',
        )
    ]
    paths += make_pictures(args, base, shown, mean, std, args.out, skipped)
    timings['pictures_s'] = time.perf_counter() - t
    timings['total_s'] = time.perf_counter() - start

    summary = {
        'checkpoint': args.checkpoint,
        'pictures_from': base.label,
        'images_measured': len(images),
        'model': base.model_config.to_dict(),
        'runs': [
            {'label': label, 'measures': {k: np.asarray(v).tolist() for k, v in sorted(m.items())}}
            for label, m in results
        ],
        'files': [os.path.basename(p) for p in paths],
        'skipped': skipped,
        'notes': notes,
        'timings': timings,
        'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
    }
    with open(os.path.join(args.out, 'whitebox.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m launch.inspect', description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', required=True, help='workdir, <workdir>/checkpoints/<step>, or an export file')
    p.add_argument('--step', type=int, help='step of a workdir (default: the newest)')
    p.add_argument('--all-steps', '--all_steps', action='store_true', help='curves for every saved step of the workdir')
    p.add_argument('--compare', nargs='*', help='more checkpoints whose curves go in curves.png')
    p.add_argument('--random-init', '--random_init', action='store_true',
                   help="add the run's random initialisation to the curves")
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--dataset', help="registered dataset name (default: the run's)")
    p.add_argument('--split_eval', '--split-eval', '--split', dest='split',
                   help="split the images come from (default: the run's eval split; auto: validation/val/test)")
    p.add_argument('--image-files', '--image_files', nargs='*', help='image files to show instead of dataset images')
    p.add_argument('--layers', default='all', help="encoder layers for attention_layers.png, '0,3' or 'all'")
    p.add_argument('--heads', default='mean', help="heads for attention_layers.png: '0,2', 'all' or 'mean'")
    p.add_argument('--images', type=int, default=4, help='images in the pictures (the first of the split)')
    p.add_argument('--image-ids', '--image_ids', default='',
                   help="indices into the split of the images to show, e.g. '3,17'")
    p.add_argument('--batch', type=int, default=64, help='images the measures average over')
    p.add_argument('--mask-ratios', '--mask_ratios', default='0.5,0.75,0.9', help='mask ratios of reconstructions.png')
    args = p.parse_args(argv)
    args.mask_ratios = [float(r) for r in args.mask_ratios.split(',') if r.strip()]
    try:
        args.image_ids = [int(i) for i in args.image_ids.split(',') if i.strip()]
    except ValueError:
        p.error(f'--image-ids must be comma-separated integers, got {args.image_ids!r}.')
    if any(i < 0 for i in args.image_ids):
        p.error('--image-ids must be non-negative.')
    if args.images < 1 or args.batch < 1:
        p.error('--images and --batch must be positive.')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f'launch.inspect: {e}', file=sys.stderr)
        return 2
    for note in summary['notes']:
        print('note:', note)
    for name, why in summary['skipped'].items():
        print(f'skipped {name}: {why}')
    print(
        f'wrote {", ".join(summary["files"])} and whitebox.json to {args.out} in {summary["timings"]["total_s"]:.1f} s'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
