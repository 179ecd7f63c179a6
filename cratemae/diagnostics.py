"""Looking inside the white box: reconstructions (and, in time, layer-wise measures) as arrays and pictures."""

import numpy as np

from cratemae import ops


def _to_pixels(images, mean, std):
    """Undo the dataset normalisation and map to uint8."""
    x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def reconstruction_panels(images, pred, mask, patch_size, mean, std, norm_pix=False):
    """Four NHWC uint8 panels per image: original, masked input, reconstruction, reconstruction with the visible
    patches pasted back. With a norm-pix model the prediction is in per-patch standardised units, so it is mapped back
    with each target patch's own mean and standard deviation (as FAIR's visualisation does)."""
    images = np.asarray(images, np.float32)
    channels = images.shape[-1]
    target = np.asarray(ops.patchify(images, patch_size))
    pred = np.asarray(pred, np.float32)
    if norm_pix:
        mu = target.mean(-1, keepdims=True)
        sigma = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
        pred = pred * sigma + mu
    mask = np.asarray(mask, np.float32)[..., None]
    grey = np.full_like(target, 0.0)
    masked = target * (1 - mask) + grey * mask
    pasted = target * (1 - mask) + pred * mask
    to_image = lambda t: np.asarray(ops.unpatchify(t, patch_size, channels))  # noqa: E731
    return [_to_pixels(x, mean, std) for x in (images, to_image(masked), to_image(pred), to_image(pasted))]


def reconstruction_grid(images, pred, mask, patch_size, mean, std, norm_pix=False, pad=2):
    """One uint8 HWC picture: a row per image, columns original / masked / reconstruction / reconstruction+visible."""
    panels = reconstruction_panels(images, pred, mask, patch_size, mean, std, norm_pix)
    n, h, w, c = panels[0].shape
    grid = np.full((n * (h + pad) + pad, 4 * (w + pad) + pad, c), 255, np.uint8)
    for row in range(n):
        for col, panel in enumerate(panels):
            top, left = pad + row * (h + pad), pad + col * (w + pad)
            grid[top : top + h, left : left + w] = panel[row]
    return grid
