"""Fine-tuning entries: a pretrained CRATE-MAE encoder plus a classification head, trained end to end.

Run one with

  python -m launch.finetune --checkpoint=PATH --config=NAME [--workdir=DIR] [--config.KEY=V]

PATH is a pretraining workdir, an export, or a reference-format file.
Each entry starts from a pretraining entry (the architecture, in ``model``) and applies the transfer recipe of the
reference's ``finetune.py`` (Ma-Lab-Berkeley/CRATE): AdamW betas (0.9, 0.999), weight decay 0.01, lr 5e-5 at batch
256, cosine over 200 epochs without warmup, RandomResizedCrop (scale 0.08-1) + flip + RandAugment(2, 14) at 224 px
(``data.randaugment``). The head reads the class token through a LayerNorm, as the reference's ``mlp_head``.
"""

import ml_collections
from ml_collections import config_dict

from experiments import base

_AUTO = ('train', 'auto')  # the dataset's own evaluation split: test for cifar, pets and the embedded data


def finetune_config(pretrain, dataset, splits, num_examples, epochs=200, batch=256, image_size=224, num_classes=None):
    """The reference transfer recipe on ``dataset`` for the architecture of the pretraining config ``pretrain``.

    ``splits`` (train, eval): the registered entries evaluate on the dataset's own evaluation split ('auto') unless
    an experiment needs another. ``num_classes`` lets AOT compiles and benchmarks build the head without the data."""
    c = pretrain
    c.data.update(
        name=dataset,
        split_train=splits[0],
        split_eval=splits[1],
        image_size=image_size,
        augment='mae',
        crop_scale=(0.08, 1.0),
        hflip=True,  # torchvision RandomResizedCrop's default scale
        randaugment=(2, 14),
    )  # the reference's RandAugment(num_ops=2, magnitude=14)
    c.model.image_size = image_size
    c.optim.update(base_lr=5e-5 * 256 / batch, min_lr=0.0, weight_decay=0.01, b1=0.9, b2=0.999, warmup_steps=0)
    steps_per_epoch = -(-num_examples // batch)
    c.train.update(
        global_batch=batch,
        steps=epochs * steps_per_epoch,
        log_every=50,
        eval_every=10 * steps_per_epoch,
        eval_batch=256,
    )
    c.checkpoint.update(every=10 * steps_per_epoch, max_to_keep=2)
    c.finetune = ml_collections.ConfigDict(
        {
            'checkpoint': config_dict.placeholder(str),  # set by --checkpoint
            'step': config_dict.placeholder(int),  # a workdir's step; None = the newest that restores
            'trust_checkpoint': False,  # read a .pth without torch.load's weights_only guard (--trust_checkpoint)
            'pool': 'cls',  # 'cls' or 'mean' (of the patch tokens)
            'head_norm': True,  # LayerNorm before the Dense head (the reference's mlp_head)
            'head_init_std': 2e-5,
            'label_smoothing': 0.0,  # the reference uses plain cross-entropy
            # The class count, for AOT compiles and benchmarks that read no data; checked against the data when training.
            'num_classes': config_dict.placeholder(int) if num_classes is None else num_classes,
            'holdout': config_dict.placeholder(int),  # --holdout: evaluate on the last PCT% of split_train instead
            'eval_on_train': False,  # --eval_on_train: allow an eval split that overlaps the train split
        }
    )
    return c


def finetune_cifar10():
    """CRATE-MAE-Base fine-tuned on CIFAR-10 at 224 px (reference transfer recipe, 200 epochs, batch 256).

    python -m launch.finetune --checkpoint=runs/crate_mae_base --config=experiments/registry.py:finetune_cifar10
    """
    return finetune_config(base.crate_mae_base(), 'cifar10', _AUTO, 50_000, num_classes=10)


def finetune_cifar100():
    """CRATE-MAE-Base fine-tuned on CIFAR-100 at 224 px (reference transfer recipe, 200 epochs, batch 256).

    python -m launch.finetune --checkpoint=runs/crate_mae_base --config=experiments/registry.py:finetune_cifar100
    """
    return finetune_config(base.crate_mae_base(), 'cifar100', _AUTO, 50_000, num_classes=100)


def finetune_oxford_flowers102():
    """CRATE-MAE-Base fine-tuned on Oxford Flowers-102 (1,020 train images, 6,149 test) at 224 px.

    python -m launch.finetune --checkpoint=runs/crate_mae_base --config=experiments/registry.py:finetune_oxford_flowers102
    """
    # tfds has a validation split too; the reference reports on test
    return finetune_config(base.crate_mae_base(), 'oxford_flowers102', ('train', 'test'), 1_020, num_classes=102)


def finetune_oxford_iiit_pet():
    """CRATE-MAE-Base fine-tuned on Oxford-IIIT Pets (trainval 3,680 = tfds 'train', test 3,669) at 224 px.

    python -m launch.finetune --checkpoint=runs/crate_mae_base --config=experiments/registry.py:finetune_oxford_iiit_pet
    """
    return finetune_config(base.crate_mae_base(), 'oxford_iiit_pet', _AUTO, 3_680, num_classes=37)


def finetune_mnist():
    """The default run's encoder (crate_mae_mnist sizes) fine-tuned on the embedded MNIST digits; 2 CPU cores, minutes.

    python -m launch.finetune --checkpoint=runs/crate_mae_mnist --config=experiments/registry.py:finetune_mnist
    Expected: top-1 on the 500 held-out digits above the linear probe of the same encoder (docs/evaluation.md).
    """
    c = finetune_config(
        base.crate_mae_mnist(), 'mnist', _AUTO, 4_500, epochs=30, batch=128, image_size=28, num_classes=10
    )
    # Digits are neither flip-invariant nor robust to 0.08-area crops: mild crops, no flip, and a higher rate for a
    # small encoder pretrained for minutes.
    c.data.update(crop_scale=(0.6, 1.0), hflip=False)
    c.optim.base_lr = 1e-3
    c.train.update(log_every=25, eval_every=350, eval_batch=128)
    c.checkpoint.update(every=350)
    c.data.randaugment = None  # solarize, posterize, equalize and 14-degree shears change what a digit is
    return c


def finetune_skimage_crops():
    """A crate_mae_mnist-sized encoder (64 px, patch 8, RGB) fine-tuned on the embedded skimage_crops (10 photos).

    Pretrain its encoder first, e.g. python -m launch.train --workdir=runs/skimage --config.data.name=skimage_crops
    --config.data.image_size=64 --config.data.channels=3 --config.model.image_size=64 --config.model.channels=3
    --config.model.patch_size=8, then --checkpoint=runs/skimage.

    python -m launch.finetune --checkpoint=runs/skimage --config=experiments/registry.py:finetune_skimage_crops
    """
    c = finetune_config(
        base.crate_mae_mnist(), 'skimage_crops', _AUTO, 2_240, epochs=30, batch=128, image_size=64, num_classes=10
    )
    c.model.update(channels=3, patch_size=8)
    c.data.update(channels=3, crop_scale=(0.35, 1.0))
    c.optim.base_lr = 1e-3
    c.train.update(log_every=25, eval_every=175, eval_batch=64)
    c.checkpoint.update(every=175)
    c.data.randaugment = None  # 2,240 crops of 10 photos: colour is half of what tells the photos apart
    return c
