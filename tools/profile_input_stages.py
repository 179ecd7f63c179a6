"""Where one core's time goes per training image: CPU ms per stage of the JPEG input path, one JSON record.

  JAX_PLATFORMS=cpu python tools/profile_input_stages.py [--images 64] [--reps 11] [--size 224]

Uses `launch.benchmark_data`'s ImageNet-like JPEGs (500x375, ~110 KiB) and times each stage on its own over the same
images: CPU time of this process (time.process_time, so a neighbour's load counts less than in wall time), the
fastest of `reps` passes, the stages run in a shuffled order in every pass so slow spells hit them alike. Stages:

  read_tfds         TfdsSource[i]: array_record read + tfds example parsing (encoded bytes out)
  grain             grain MapDataset shuffle + random_map per element, on a source that does nothing
  open_header       PIL open (header) + the EXIF orientation, as decode_crop reads them
  decode_pil        PIL decode of the whole JPEG (libjpeg-turbo, accurate IDCT, fancy upsampling)
  decode_pil_1_8    the same at 1/8 scale (Image.draft): almost only the entropy decoding, which every decode pays
  decode_simplejpeg(_fast)   simplejpeg (if installed), default / fastdct + fastupsample; +simplejpeg_to_pil: the
                    Image.fromarray copy that resizing with PIL would add
  decode_simplejpeg_M_8   simplejpeg's scaled decode at M/8 (M = 7, 6, 5, 4, 3): libjpeg-turbo's other IDCT sizes
  resize_bicubic    PIL bicubic (antialiased) resize of a RandomResizedCrop box of the decoded image to size
  resize_torch      the same box resized by PyTorch's uint8 antialiased bicubic (decode.py's resize='torch')
  resize_bicubic_gap1   the same with reducing_gap=1: PIL first box-averages by the integer factor int(crop / size)
                    when that is >= 2 (Image.reduce), then resamples bicubic
  to_array, hflip   np.asarray of the size x size result; augment.hflip of it (half of the images pay it)
  hflip_pil         the flip as the decoder does it: PIL transpose of the size x size result, then np.asarray
  normalize         augment.normalize per image of a 64-image uint8 batch (float32 batches only)
  decode_crop       decode.decode_crop: open + decode + crop/resize + to array (the stages above, as the pipeline runs them)
  decode_crop_torch the same with resize='torch' (and decode_crop_256_torch on the 256 px images)
  transform         the pipeline's train transform on encoded bytes (decode_crop + the flip)
  example_tfds      pipe.example(g) on the tfds dataset: read + grain + transform (the decode + augment figure)
  batch_tfds        pipe.batch(step) per image: + stacking and float32 normalisation
  decode_pil_256, decode_crop_256   the same images stored pre-resized to a 256 px short side (bicubic, quality 95):
                    what storing smaller images at prepare time would cost instead (not something the pipeline does)

`differences` gives, over the same crops at `size`, the mean and largest |difference| (grey levels) from the pipeline's
result of reducing_gap=1 (and the share of crops >= 2x size, the only ones it changes) and of simplejpeg's fastdct +
fastupsample decode.
"""

import argparse
import datetime
import io
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import features

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cratemae import data  # noqa: E402
from cratemae.data import augment  # noqa: E402
from cratemae.data import decode  # noqa: E402
from cratemae.data import throughput  # noqa: E402
from tools import machine  # noqa: E402

try:
    import simplejpeg
except ImportError:
    simplejpeg = None

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _NullSource:
    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        return int(i), b'', 0


def _shrunk(payload, short_side):
    """The JPEG resized (bicubic) to `short_side` px on its short side, re-encoded at quality 95."""
    im = Image.open(io.BytesIO(payload))
    s = short_side / min(im.size)
    buf = io.BytesIO()
    im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC).save(buf, 'JPEG', quality=95)
    return buf.getvalue()


def _simplejpeg_scaled(payload, m):
    height, width, _, _ = simplejpeg.decode_jpeg_header(payload)
    return simplejpeg.decode_jpeg(payload, 'RGB', min_height=height * m // 8, min_width=width * m // 8)


def stages(images, size, root):
    """name -> callable(i) doing one image's work of that stage."""
    import grain  # pylint: disable=import-outside-toplevel

    jpegs = throughput.imagenet_like_jpegs(images)
    payloads = [b for b, _ in jpegs]
    throughput.write_data(root, jpegs)
    rng = np.random.default_rng(0)
    boxes = []
    for b in payloads:
        w, h = Image.open(io.BytesIO(b)).size
        boxes.append(augment.random_resized_crop_box(rng, h, w))
    pil_boxes = [(l, t, l + w, t + h) for t, l, h, w in boxes]
    decoded = [Image.open(io.BytesIO(b)) for b in payloads]
    for im in decoded:
        im.load()
    resized = [im.resize((size, size), Image.BICUBIC, box=b) for im, b in zip(decoded, pil_boxes)]
    arrays_full = [np.array(im) for im in decoded]
    outputs = [np.asarray(im) for im in resized]
    batch = np.stack([outputs[i % images] for i in range(64)])
    pipe = data.make_pipeline(throughput._config('tfds_jpeg', root, size, 0), 'train', 64, seed=0)  # pylint: disable=protected-access
    source = pipe._batcher.source  # pylint: disable=protected-access
    transform = pipe._batcher.transform  # pylint: disable=protected-access
    examples = [(i, *source[i]) for i in range(images)]
    small = [_shrunk(b, 256) for b in payloads]
    small_boxes = []
    for b in small:
        w, h = Image.open(io.BytesIO(b)).size
        small_boxes.append(augment.random_resized_crop_box(rng, h, w))
    null = grain.MapDataset.source(_NullSource()).shuffle(seed=1).random_map(lambda x, r: x, seed=2)

    def decode_scaled(i):
        im = Image.open(io.BytesIO(payloads[i]))
        im.draft('RGB', (im.size[0] // 8, im.size[1] // 8))
        im.load()

    def open_header(i):
        decode.displayed_size(decode.open_image(payloads[i]))

    out = {
        'read_tfds': lambda i: source[i],
        'grain': lambda i: null[i],
        'open_header': open_header,
        'decode_pil': lambda i: Image.open(io.BytesIO(payloads[i])).load(),
        'decode_pil_1_8': decode_scaled,
        'resize_bicubic': lambda i: decoded[i].resize((size, size), Image.BICUBIC, box=pil_boxes[i]),
        'resize_bicubic_gap1': lambda i: decoded[i].resize(
            (size, size), Image.BICUBIC, box=pil_boxes[i], reducing_gap=1.0
        ),
        'to_array': lambda i: np.asarray(resized[i]),
        'hflip_pil': lambda i: np.asarray(resized[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        'hflip': lambda i: augment.hflip(outputs[i]),
        'normalize': lambda i: augment.normalize(batch, MEAN, STD) if i % 64 == 0 else None,
        'decode_crop': lambda i: decode.decode_crop(payloads[i], lambda h, w, b=boxes[i]: b, size, 3),
        'transform': lambda i: transform.train(examples[i], np.random.default_rng(i)),
        'example_tfds': lambda i: pipe.example(i),
        'batch_tfds': lambda i: pipe.batch(i // 64) if i % 64 == 0 else None,
        'decode_pil_256': lambda i: Image.open(io.BytesIO(small[i])).load(),
        'decode_crop_256': lambda i: decode.decode_crop(small[i], lambda h, w, b=small_boxes[i]: b, size, 3),
        'decode_crop_torch': lambda i: decode.decode_crop(
            payloads[i], lambda h, w, b=boxes[i]: b, size, 3, resize='torch'
        ),
        'decode_crop_256_torch': lambda i: decode.decode_crop(
            small[i], lambda h, w, b=small_boxes[i]: b, size, 3, resize='torch'
        ),
        'resize_torch': lambda i: decode._resize_torch(arrays_full[i], pil_boxes[i], size, False),  # pylint: disable=protected-access
    }
    if not decode.torch_available():
        for name in ('decode_crop_torch', 'decode_crop_256_torch', 'resize_torch'):
            del out[name]
    if simplejpeg is not None:
        arrays = [simplejpeg.decode_jpeg(b, 'RGB') for b in payloads]
        out['decode_simplejpeg'] = lambda i: simplejpeg.decode_jpeg(payloads[i], 'RGB')
        out['decode_simplejpeg_fast'] = lambda i: simplejpeg.decode_jpeg(
            payloads[i], 'RGB', fastdct=True, fastupsample=True
        )
        out['simplejpeg_to_pil'] = lambda i: Image.fromarray(arrays[i])
        for m in (7, 6, 5, 4, 3):
            out[f'decode_simplejpeg_{m}_8'] = lambda i, m=m: _simplejpeg_scaled(payloads[i], m)
    return out, differences(decoded, pil_boxes, payloads, outputs, size)


def _abs_diff(got, want):
    d = [np.abs(np.asarray(g, np.float64) - w) for g, w in zip(got, want)]
    return {'mean': round(float(np.mean([x.mean() for x in d])), 3), 'max': int(max(x.max() for x in d))}


def differences(decoded, pil_boxes, payloads, outputs, size):
    """|alternative - pipeline| over the crops, in grey levels."""
    out = {}
    big = [i for i, (l, t, r, b) in enumerate(pil_boxes) if min(r - l, b - t) >= 2 * size]
    out['reducing_gap_1'] = {'crops_at_least_2x': round(len(big) / len(pil_boxes), 3)}
    if big:
        gap = [decoded[i].resize((size, size), Image.BICUBIC, box=pil_boxes[i], reducing_gap=1.0) for i in big]
        out['reducing_gap_1'].update(_abs_diff(gap, [outputs[i] for i in big]))
    if simplejpeg is not None:
        fast = [
            Image.fromarray(simplejpeg.decode_jpeg(b, 'RGB', fastdct=True, fastupsample=True)).resize(
                (size, size), Image.BICUBIC, box=box
            )
            for b, box in zip(payloads, pil_boxes)
        ]
        out['simplejpeg_fast'] = _abs_diff(fast, outputs)
    return out


def measure(images=64, reps=11, size=224):
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        fns, diffs = stages(images, size, root)
        best = {k: float('inf') for k in fns}
        order = list(fns)
        for _ in range(reps):
            random.shuffle(order)
            for name in order:
                fn = fns[name]
                c0 = time.process_time()
                for i in range(images):
                    fn(i)
                best[name] = min(best[name], (time.process_time() - c0) / images * 1e3)
    return {
        'date': datetime.date.today().isoformat(),
        'cpu': machine.cpu_model(),
        'cores': os.cpu_count(),
        'pillow': Image.__version__,
        'libjpeg_turbo': features.version_feature('libjpeg_turbo'),
        'simplejpeg': getattr(simplejpeg, '__version__', None),
        'images': images,
        'reps': reps,
        'size': size,
        'cpu_ms_per_image': {k: round(v, 3) for k, v in best.items()},
        'differences': diffs,
        'example_per_cpu_second': round(1e3 / best['example_tfds'], 1),
        'batch_per_cpu_second': round(1e3 / best['batch_tfds'], 1),
        'load_before': [round(x, 2) for x in load_before],
        'load_after': [round(x, 2) for x in os.getloadavg()],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--images', type=int, default=64, help='JPEGs (a multiple of 64 for the batch stages)')
    parser.add_argument('--reps', type=int, default=11, help='passes per stage; the fastest counts')
    parser.add_argument('--size', type=int, default=224)
    args = parser.parse_args()
    if args.images < 64 or args.images % 64:
        parser.error('--images must be a positive multiple of 64 (the batch stages time whole 64-image batches)')
    print(json.dumps(measure(args.images, args.reps, args.size)), flush=True)


if __name__ == '__main__':
    main()
