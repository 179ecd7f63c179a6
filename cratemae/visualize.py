"""Pictures of the white-box measures and maps (matplotlib on an Agg canvas: no display, no pyplot global state).

Every function takes NumPy arrays (from ``cratemae.diagnostics``), writes one PNG and returns its path.
"""

import io
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

_DPI = 80

_CURVE_PANELS = (
    ('compression', 'coding rate $R^c$ vs layer $\\ell$ subspaces', 'lower = more compressed'),
    ('sparsity_zeros', 'fraction of exact zeros in ISTA output', 'higher = sparser'),
    ('sparsity_l1_l2', '$\\|z\\|_1 / (\\sqrt{d}\\,\\|z\\|_2)$ of ISTA output', 'lower = sparser'),
    ('inversion_error', 'decoder $L-1-\\ell$ vs encoder input $Z^\\ell$', 'relative error'),
)


def _figure(width, height):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi=_DPI, title=None):
    """Writes the figure as a 256-colour PNG (a third of the RGBA size; maps and curves need no more colours)."""
    if title:
        fig.suptitle(title, fontsize=8)
        fig.tight_layout(pad=0.2, rect=(0, 0, 1, 0.95))
    else:
        fig.tight_layout(pad=0.2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, bbox_inches='tight', pad_inches=0.05)
    buffer.seek(0)
    Image.open(buffer).convert('RGB').quantize(256).save(path, optimize=True)
    return path


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


def layer_curves(runs, path, title=None):
    """Paper Fig. 4-style curves through the encoder: one line per run (label, measures).

    ``measures`` is ``diagnostics.whitebox_measures``' dict. Compression shows the layer input (dashed, 'before') and
    output (solid, 'after'), both against that layer's subspaces; a shaded band is +-1 std over the batch when at most
    three runs are drawn. The inversion panel appears when any run has a decoder.
    """
    panels = [p for p in _CURVE_PANELS if p[0] != 'inversion_error' or any('inversion_error' in m for _, m in runs)]
    fig = _figure(3.6 * len(panels), 3.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = _colors(len(runs))
    for ax, (key, ylabel, note) in zip(axes, panels):
        for (label, m), color in zip(runs, colors):
            series = (
                [('compression_before', '--', None), ('compression_after', '-', label)]
                if key == 'compression'
                else [(key, '-', label)]
            )
            for name, style, line_label in series:
                if name not in m:
                    continue
                y = np.asarray(m[name], np.float64)
                x = np.arange(len(y))
                ax.plot(x, y, style, color=color, marker='o', markersize=3, label=line_label)
                if len(runs) <= 3 and name + '_std' in m:
                    s = np.asarray(m[name + '_std'], np.float64)
                    ax.fill_between(x, y - s, y + s, color=color, alpha=0.12, linewidth=0)
        ax.set_xlabel('encoder layer $\\ell$')
        ax.set_title(f'{ylabel}\n({note})', fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], 'k--', label='before (layer input)')
    axes[0].plot([], [], 'k-', label='after (layer output)')
    axes[0].legend(fontsize=6, loc='best')
    return _save(fig, path, title=title)


def overlay_grid(images, maps, path, col_labels, row_labels=None, title=None, alpha=0.6, cmap='inferno'):
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
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
            ax.imshow(a, cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation='bilinear')
            if i == 0:
                ax.set_title(col_labels[j], fontsize=7)
    axes[0, 0].set_title('image', fontsize=7)
    return _save(fig, path, title=title)


def pca_grid(images, rgb, path, title=None):
    """Two rows: the images, and their patch features' first three principal components as RGB on the patch grid.

    images: (n, H, W, C) uint8; rgb: (n, G, G, 3) in [0, 1].
    """
    images, rgb = np.asarray(images), np.asarray(rgb, np.float32)
    n = images.shape[0]
    fig = _figure(1.1 * n, 2.4 + (0.3 if title else 0.0))
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        _show_image(axes[0, i], images[i])
        axes[1, i].imshow(rgb[i], interpolation='nearest')
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
    axes[0, 0].set_ylabel('image', fontsize=7)
    axes[1, 0].set_ylabel('PCA (RGB)', fontsize=7)
    return _save(fig, path, title=title)


def labelled_grids(grids, path, title=None):
    """Uint8 grid pictures (e.g. ``diagnostics.reconstruction_grid``) side by side, each under its label."""
    fig = _figure(2.6 * len(grids), 0.4 + 2.6 * max(g.shape[0] / g.shape[1] for _, g in grids))
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (label, grid) in zip(axes, grids):
        _show_image(ax, grid)
        ax.set_title(label, fontsize=8)
    return _save(fig, path, dpi=110, title=title)
