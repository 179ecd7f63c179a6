"""The accuracy cost of a re-encoded copy: the same short pretraining from the original and from the re-encoded images.

  python tools/reencode_accuracy.py [--train_images=1500] [--eval_images=500] [--seeds=0,1,2] [--steps=150]
      [--forms=original,reencoded] [--short_side=320] [--quality=90] [--root=DIR] [--out=FILE] [--no_baselines]
      [-- --config.KEY=VALUE ...]

Data (no download): ``throughput.imagenet_like_jpegs`` (500x375 / 375x500, quality 95, natural photos with a
texture's high-pass detail added), a training set (seed 1) and a held-out set (seed 2), laid out under ROOT as

  * original/{train,validation}/class_<photo>: the training images and the held-out ones;
  * reencoded/train: original/train re-encoded by ``reencode.reencode`` at (short side, quality), the call
    ``python -m launch.prepare_data image_folder --folder=... --reencode_to=...`` makes; reencoded/validation: hard
    links to the held-out originals, so that both forms are judged on the same full-quality images;
  * texture/{train,validation}/class_<texture>: the same original images labelled by the texture whose high-pass
    was added, a label that only the fine detail carries (the detail a copy may lose); the photo label is easy.

For each seed, each form in turn: ``default_run_report.train`` runs ``python -m launch.train`` on that form's folder
with the CONFIG below (a small CRATE-MAE at 224 px, patch 16, the visible-only encoder, MAE augmentation; the seed
changes the initialisation and the masks, not the images), then ``default_run_report.probes`` probes the frozen mean
patch token (linear, ridge, kNN; read in process: a worker's start-up would cost more than it saves) on the
original images, labelled by photo and by texture, so that the probes differ
only by the encoder. The first run also probes a random encoder of the same architecture (the floor). One JSON line per
run: form, seed, bytes_per_image of its training folder, the held-out loss at each evaluation, the probes, wall and
CPU seconds, load average, CPU model, date. A rerun with the same ROOT reuses the data.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tools import default_run_report  # noqa: E402
from tools import machine  # noqa: E402

CONFIG = 'experiments/registry.py:crate_mae_tiny'
# crate_mae_tiny cut to what 2 shared cores train in ~5 min: 4x128 encoder, 2x128 decoder, batch 32; the learning
# rate of the default run (lr = base_lr * 32 / 256 = 1.25e-3), checkpoint at the end only.
OVERRIDES = (
    '--config.model.width=128',
    '--config.model.depth=4',
    '--config.model.heads=4',
    '--config.model.decoder_width=128',
    '--config.model.decoder_depth=2',
    '--config.model.decoder_heads=4',
    '--config.model.encoder_sees_mask_tokens=False',
    '--config.model.norm_pix_loss=True',
    '--config.data.name=image_folder',
    '--config.train.global_batch=32',
    '--config.train.log_every=50',
    '--config.train.eval_batch=100',
    '--config.optim.base_lr=0.01',
    '--config.eval.images=4',
)


def write_split(folder, jpegs, label_index):
    """jpegs [(bytes, photo, texture)] -> folder/class_<label>/<i>.jpg, label = entry `label_index`."""
    for i, entry in enumerate(jpegs):
        path = os.path.join(folder, f'class_{entry[label_index]}', f'{i:05d}.jpg')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(entry[0])


def link_tree(source, target):
    shutil.copytree(source, target, copy_function=os.link)


def prepare(root, train_images, eval_images, bound, workers):
    """The three folders of the module docstring under root (reused when complete); {form: training folder}."""
    from cratemae.data import reencode
    from cratemae.data import throughput

    done = os.path.join(root, 'complete.json')
    settings = {'train_images': train_images, 'eval_images': eval_images, 'bound': list(vars(bound).values())}
    if os.path.exists(done):
        with open(done, encoding='utf-8') as f:
            if json.load(f) != settings:
                raise SystemExit(f'{root} holds data made with other settings; give another --root')
    else:
        if os.path.exists(root) and os.listdir(root):
            raise SystemExit(f'{root} is not empty and was not made by this tool; give another --root')
        train = throughput.imagenet_like_jpegs(train_images, seed=1, with_texture=True)
        held_out = throughput.imagenet_like_jpegs(eval_images, seed=2, with_texture=True)
        for split, jpegs in (('train', train), ('validation', held_out)):
            write_split(os.path.join(root, 'original', split), jpegs, 1)
            write_split(os.path.join(root, 'texture', split), jpegs, 2)
        reencode.reencode(
            os.path.join(root, 'reencoded', 'train'),
            bound,
            folder=os.path.join(root, 'original', 'train'),
            workers=workers,
        )
        link_tree(os.path.join(root, 'original', 'validation'), os.path.join(root, 'reencoded', 'validation'))
        with open(done, 'w', encoding='utf-8') as f:
            json.dump(settings, f)
    return {form: os.path.join(root, form) for form in ('original', 'reencoded')}


def bytes_per_image(folder):
    from cratemae import data
    from cratemae.data import throughput

    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=folder, split_train='train')
    return throughput.bytes_per_image(cfg)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train_images', type=int, default=1500)
    parser.add_argument('--eval_images', type=int, default=500)
    parser.add_argument('--seeds', default='0,1,2')
    parser.add_argument('--forms', default='original,reencoded', help='which forms to train, in this order')
    parser.add_argument('--steps', type=int, default=150)
    parser.add_argument('--evals', type=int, default=3, help='held-out evaluations per run, the last at the end')
    parser.add_argument('--short_side', type=int, default=None, help='default: the re-encoder\'s (320)')
    parser.add_argument('--quality', type=int, default=None, help='default: the re-encoder\'s (90)')
    parser.add_argument('--no_baselines', action='store_true', help='no random-encoder probe in the first run')
    parser.add_argument('--workers', default='auto', help='re-encoding processes')
    parser.add_argument('--root', default=None, help='keep the data here (a rerun reuses it)')
    parser.add_argument('--out', default=None, help='append the records to this JSONL file too')
    args, extra = parser.parse_known_args()
    extra = [o for o in extra if o != '--']
    from cratemae.data import reencode

    bound = reencode.Bound(
        args.short_side or reencode.DEFAULT_SHORT_SIDE, None, args.quality or reencode.DEFAULT_QUALITY
    )
    bound.check()
    if not set(args.forms.split(',')) <= {'original', 'reencoded'}:
        raise SystemExit(f'--forms={args.forms!r}: name original and/or reencoded, comma-separated')
    if args.steps % args.evals:
        raise SystemExit(f'--steps={args.steps} must be a multiple of --evals={args.evals}')
    if args.eval_images % 100:
        raise SystemExit(f'--eval_images={args.eval_images} must be a multiple of 100 (the evaluation batch)')
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or os.path.join(tmp, 'data')
        folders = prepare(root, args.train_images, args.eval_images, bound, args.workers)
        sizes = {form: bytes_per_image(folder) for form, folder in folders.items()}
        first = not args.no_baselines
        for seed in (int(s) for s in args.seeds.split(',')):
            for form in args.forms.split(','):
                folder = folders[form]
                overrides = [
                    *OVERRIDES,
                    f'--config.data.folder={folder}',
                    f'--config.train.steps={args.steps}',
                    f'--config.train.eval_every={args.steps // args.evals}',
                    f'--config.train.eval_batches={args.eval_images // 100}',
                    f'--config.optim.warmup_steps={max(1, args.steps // 10)}',
                    f'--config.checkpoint.every={args.steps}',
                    *extra,
                ]
                workdir = os.path.join(tmp, f'{form}_seed{seed}')
                load_before = os.getloadavg()
                record = {'tool': 'reencode_accuracy', 'date': datetime.datetime.now().isoformat(timespec='seconds')}
                record.update(form=form, seed=seed, bytes_per_image=sizes[form], images=args.train_images)
                record.update(held_out_images=args.eval_images, config=CONFIG, overrides=overrides)
                record.update(short_side=bound.short_side, quality=bound.quality, cpu=machine.cpu_model(with_isa=True))
                record.update(default_run_report.train(CONFIG, seed, overrides, workdir))
                record['load_average_before_after'] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
                losses, steps = default_run_report.held_out_losses(workdir)
                record.update(eval_steps=steps, eval_loss=losses)
                record['probes'] = {
                    label: default_run_report.probes(
                        workdir,
                        seed,
                        baselines=('random',) if first else (),
                        data_updates={'folder': os.path.join(root, source), 'num_workers': 0},
                    )
                    for label, source in (('photo', 'original'), ('texture', 'texture'))
                }
                record['cpu_s'] = round(record['user_s'] + record['sys_s'], 1)
                first = False
                shutil.rmtree(workdir, ignore_errors=True)
                default_run_report.emit(record, args.out)


if __name__ == '__main__':
    main()
