"""Pictures of the white-box measures, maps and reconstructions, returned as uint8 HWC arrays.

Every picture function takes NumPy arrays (the measures of ``cratemae.diagnostics``) and returns an (H, W, 3) uint8
array: the training loop logs it to TensorBoard as it is, and ``save_png`` writes it where a file is wanted. The
figures are drawn with matplotlib on an Agg canvas (no display, no pyplot global state).
"""

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cratemae import ops

_DPI = 80
_TINY = 1e-12
PCA_STYLES = ('joint', 'reference')


# ----------------------------------------------------------------------------------------------------------------
# Canvas.


def _figure(width, height):
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _to_array(fig, dpi=_DPI, title=None):
    """The figure's pixels as (H, W, 3) uint8, laid out tightly (the canvas is drawn once, never saved)."""
    if title:
        fig.suptitle(title, fontsize=8)
        fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.95))
    else:
        fig.tight_layout(pad=0.3)
    fig.set_dpi(dpi)
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(image, path):
    """Writes an (H, W, C) uint8 picture as a 256-colour PNG (a third of the RGB size; plots need no more colours);
    local paths and gs:// alike. Returns the path as a string."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if picture.mode == 'RGB':
        picture = picture.quantize(256)
    with path.open('wb') as f:
        picture.save(f, format='PNG', optimize=True)
    return str(path)


def _show_image(ax, image):
    """An HWC uint8 image, grey for one channel, without ticks."""
    image = np.asarray(image)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=255, interpolation='nearest')
    else:
        ax.imshow(image, interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])


def _colors(n):
    """Distinguishable colours; an ordered ramp for many runs (e.g. training steps)."""
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel

    if n <= 10:
        return [colormaps['tab10'](i) for i in range(n)]
    return [colormaps['viridis'](i / max(n - 1, 1)) for i in range(n)]


def _layer_axis(ax, depth, title, ylabel):
    ax.set_xlabel('encoder layer (1 = first)', fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_xticks(np.arange(1, depth + 1))
    ax.tick_params(labelsize=7)
    ax.grid(linestyle='--', color='gray', alpha=0.4)


def _errorbar_line(ax, m, key, color, label, marker, bars):
    """One run's measure against layers 1..L, with +-1 std bars (the reference's errorbars) when ``bars``."""
    y = np.asarray(m[key], np.float64)
    x = np.arange(1, len(y) + 1)
    ax.plot(
        x,
        y,
        marker=marker,
        markersize=4,
        markeredgecolor='black',
        markeredgewidth=0.5,
        color=color,
        label=label,
        linewidth=1.5,
    )
    if bars and key + '_std' in m:
        ax.errorbar(
            x,
            y,
            yerr=np.asarray(m[key + '_std'], np.float64),
            fmt='none',
            ecolor=color,
            alpha=0.6,
            capsize=3,
            elinewidth=1.2,
            zorder=0,
        )


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise figures. ``runs`` is [(label, measures)] with ``diagnostics.whitebox_measures``' dicts.


def layerwise(runs, title=None):
    """The reference's layer-wise figure (``vis_utils/plot.py``): x = encoder layer 1..L, one line per run.

    Left, R^c at the reference's point: the MSSA input of layer l in that layer's subspaces, LN1(Z^l) U_l^T
    (``compression_input``). Right, the reference's sparsity value 1 - (fraction of exact zeros) of the ISTA output
    Z^{l+1} (``sparsity_l0``; lower = sparser). Error bars are +-1 std over the batch when at most three runs are
    drawn.
    """
    depth = len(np.asarray(runs[0][1]['compression_input']))
    fig = _figure(7.2, 3.0)
    left, right = fig.subplots(1, 2)
    bars = len(runs) <= 3
    for (label, m), color in zip(runs, _colors(len(runs))):
        _errorbar_line(left, m, 'compression_input', color, label, 'o', bars)
        _errorbar_line(right, m, 'sparsity_l0', color, label, 's', bars)
    _layer_axis(
        left,
        depth,
        'Compression at the MSSA input (reference hook)',
        '$R^c$ of LN$_1(Z^\\ell)\\,U_\\ell^T$, $\\epsilon=0.01$ (lower = more compressed)',
    )
    _layer_axis(right, depth, 'Sparsity of the ISTA output', '$1 -$ zero fraction of $Z^{\\ell+1}$ (lower = sparser)')
    left.legend(fontsize=6, loc='best')
    return _to_array(fig, title=title)


def mssa_ista(runs, title=None, paper=False):
    """What the two steps of each layer do to the coding rate, all against that layer's LN1 and U_l.

    Left: for each layer l, R^c at the MSSA input Z^l (circle), the MSSA output Z^{l+1/2} (square) and the layer
    output Z^{l+1} (triangle), joined within the layer. Middle: the MSSA effect R^c(Z^{l+1/2}) - R^c(Z^l) (< 0: the
    MSSA step compressed). Right: the ISTA effect R^c(Z^{l+1}) - R^c(Z^{l+1/2}). ``paper`` draws the paper-exact
    variant instead (orthonormal U_k, no per-token normalisation).
    """
    rate = 'compression_paper_' if paper else 'compression_'
    mssa, ista = ('mssa_effect_paper', 'ista_effect_paper') if paper else ('mssa_effect', 'ista_effect')
    depth = len(np.asarray(runs[0][1][rate + 'input']))
    fig = _figure(10.8, 3.0)
    axes = fig.subplots(1, 3)
    bars = len(runs) <= 3
    offsets = {'input': -0.25, 'mid': 0.0, 'output': 0.25}
    markers = {'input': 'o', 'mid': 's', 'output': '^'}
    for (label, m), color in zip(runs, _colors(len(runs))):
        values = {p: np.asarray(m[rate + p], np.float64) for p in offsets}
        for layer in range(depth):
            x = [layer + 1 + offsets[p] for p in offsets]
            axes[0].plot(
                x,
                [values[p][layer] for p in offsets],
                '-',
                color=color,
                linewidth=1.2,
                label=label if layer == 0 else None,
            )
            for p, xp in zip(offsets, x):
                axes[0].plot(
                    xp,
                    values[p][layer],
                    markers[p],
                    color=color,
                    markersize=4,
                    markeredgecolor='black',
                    markeredgewidth=0.5,
                )
        _errorbar_line(axes[1], m, mssa, color, label, 'o', bars)
        _errorbar_line(axes[2], m, ista, color, label, 's', bars)
    variant = 'orthonormal $U_k$, no token normalisation' if paper else 'LN$_1$ and $U_\\ell$ of the layer'
    _layer_axis(
        axes[0],
        depth,
        f'$R^c$ at MSSA input (o), MSSA output (s), layer output (^)\n({variant})',
        '$R^c$ (lower = more compressed)',
    )
    _layer_axis(
        axes[1],
        depth,
        'MSSA effect: $R^c(Z^{\\ell+1/2}) - R^c(Z^\\ell)$\n(< 0: the MSSA step compressed)',
        '$\\Delta R^c$',
    )
    _layer_axis(
        axes[2], depth, 'ISTA effect: $R^c(Z^{\\ell+1}) - R^c(Z^{\\ell+1/2})$\n(same $U_\\ell$)', '$\\Delta R^c$'
    )
    for ax in axes[1:]:
        ax.axhline(0.0, color='black', linewidth=0.8)
    axes[0].legend(fontsize=6, loc='best')
    return _to_array(fig, title=title)


def sparsity_and_inversion(runs, title=None):
    """Our further measures per layer 1..L: ||z||_1 / (sqrt(d) ||z||_2) of the ISTA output (lower = sparser, it also
    sees near-zeros), and, when a run has a reference-layout decoder, the relative error of decoder layer L-l's output
    against encoder layer l's input (0 = an exact layer-wise inverse)."""
    keys = [('sparsity_l1_l2', 'ISTA output: mean $\\|z\\|_1 / (\\sqrt{d}\\,\\|z\\|_2)$', 'lower = sparser')]
    if any('inversion_error' in m for _, m in runs):
        keys.append(
            (
                'inversion_error',
                'decoder layer $L-\\ell+1$ output vs encoder layer $\\ell$ input',
                'relative error $\\|Y - Z\\|_F / \\|Z\\|_F$',
            )
        )
    depth = len(np.asarray(runs[0][1]['sparsity_l1_l2']))
    fig = _figure(3.6 * len(keys), 3.0)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    bars = len(runs) <= 3
    for (label, m), color in zip(runs, _colors(len(runs))):
        for ax, (key, _, _) in zip(axes, keys):
            if key in m:
                _errorbar_line(ax, m, key, color, label, 'o', bars)
    for ax, (_, name, ylabel) in zip(axes, keys):
        _layer_axis(ax, depth, name, ylabel)
    axes[0].legend(fontsize=6, loc='best')
    return _to_array(fig, title=title)


# ----------------------------------------------------------------------------------------------------------------
# Maps over images.


def overlay_grid(images, maps, col_labels, row_labels=None, title=None, alpha=0.6, cmap='inferno'):
    """Rows of [image, map_1 over the image, map_2 over the image, ...].

    images: (n, H, W, C) uint8; maps: (n, m, G, G) (e.g. class-token attention on the patch grid), each rescaled to
    [0, 1] and drawn bilinearly upsampled over its image.
    """
    images, maps = np.asarray(images), np.asarray(maps, np.float32)
    n, m = maps.shape[:2]
    h, w = images.shape[1:3]
    fig = _figure(1.15 * (m + 1), 1.2 * n + (0.4 if title else 0.1))
    axes = fig.subplots(n, m + 1, squeeze=False)
    for i in range(n):
        _show_image(axes[i, 0], images[i])
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
        for j in range(m):
            ax = axes[i, j + 1]
            _show_image(ax, images[i])
            a = maps[i, j]
            a = (a - a.min()) / max(float(a.max() - a.min()), _TINY)
            ax.imshow(a, cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation='bilinear')
            if i == 0:
                ax.set_title(col_labels[j], fontsize=7)
    axes[0, 0].set_title('image', fontsize=7)
    return _to_array(fig, title=title)


def pca_rgb(features, style='joint'):
    """Per-patch RGB from principal components of patch features (B, L, d), fitted jointly on all B x L patches:

        F~ = F - mean,  F~ = U S V^T,  c = F~ V[:, j],  rgb = min-max scaled components.

    style='joint' (ours): components PC1-PC3, each scaled over all B images together, so colours compare across
    images. style='reference' (``vis_utils/pca_visualization.py``): a 4-component PCA whose last three, PC2-PC4, are
    the colours, each scaled on every image by its own minimum and maximum. Each component's sign makes its largest
    loading positive. Returns (B, L, 3) float32 in [0, 1].
    """
    if style not in PCA_STYLES:
        raise ValueError(f'PCA style {style!r} is unknown; use one of {PCA_STYLES}.')
    f = np.asarray(features, np.float64)
    b, n, d = f.shape
    flat = f.reshape(b * n, d)
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    chosen = slice(0, 3) if style == 'joint' else slice(1, 4)
    vt = vt[chosen]
    largest = np.abs(vt).argmax(1)
    vt = vt * np.sign(vt[np.arange(len(vt)), largest])[:, None]
    c = flat @ vt.T
    if c.shape[1] < 3:  # fewer features than components
        c = np.pad(c, ((0, 0), (0, 3 - c.shape[1])))
    c = c.reshape(b, n, 3)
    axes = (0, 1) if style == 'joint' else (1,)
    lo, hi = c.min(axes, keepdims=True), c.max(axes, keepdims=True)
    return ((c - lo) / np.maximum(hi - lo, _TINY)).astype(np.float32)


def pca_grid(images, rgb, label='PCA (RGB)', title=None):
    """Two rows: the images, and their patch features' principal components as RGB on the patch grid.

    images: (n, H, W, C) uint8; rgb: (n, G, G, 3) in [0, 1]; ``label`` names the components and their scaling.
    """
    images, rgb = np.asarray(images), np.asarray(rgb, np.float32)
    n = images.shape[0]
    fig = _figure(max(1.1 * n, 2.2), 2.4 + (0.3 if title else 0.0))
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        _show_image(axes[0, i], images[i])
        axes[1, i].imshow(rgb[i], interpolation='nearest')
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
    axes[0, 0].set_ylabel('image', fontsize=7)
    axes[1, 0].set_ylabel(label, fontsize=7)
    return _to_array(fig, title=title)


# ----------------------------------------------------------------------------------------------------------------
# Reconstructions.


def to_pixels(images, mean, std):
    """Normalised float images back to uint8 (undoing the dataset's mean and std)."""
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
    masked = target * (1 - mask)
    pasted = target * (1 - mask) + pred * mask
    to_image = lambda t: np.asarray(ops.unpatchify(t, patch_size, channels))  # noqa: E731
    return [to_pixels(x, mean, std) for x in (images, to_image(masked), to_image(pred), to_image(pasted))]


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


def labelled_grids(grids, title=None):
    """Uint8 grid pictures (e.g. ``reconstruction_grid``) side by side, each under its label."""
    fig = _figure(2.6 * len(grids), 0.4 + 2.6 * max(g.shape[0] / g.shape[1] for _, g in grids))
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (label, grid) in zip(axes, grids):
        _show_image(ax, grid)
        ax.set_title(label, fontsize=8)
    return _to_array(fig, dpi=110, title=title)
