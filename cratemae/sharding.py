"""Device mesh, regex parameter-sharding rules, host-local -> global batches (start-up: cratemae.distributed).

The mesh always has the three axes ('data', 'fsdp', 'model') with Auto axis types (the
old jit-propagated behaviour; `jax.make_mesh` would otherwise default to Explicit axes).
The batch is split over ('data', 'fsdp') together, so FSDP is data parallelism whose
parameters and optimizer state are additionally sharded over 'fsdp'.

Parameter placement comes from a list of rules `[(regex, spec), ...]`:
  * the regex is applied with `re.search` to the '/'-joined path of every leaf, e.g.
    'encoder/layers/mssa/qkv/kernel' for params, '0/mu/encoder/layers/mssa/qkv/kernel' for the
    matching AdamW moment. `search` (not `fullmatch`) is deliberate: optimizer-state paths end
    with the parameter path, so one rule places a parameter and its moments identically.
    Anchor with '$' (or '^') when you need to.
  * first match wins; a leaf that no rule matches is replicated, P().
  * spec is a tuple of mesh-axis names / None / tuples of names (one entry per leading dim,
    missing trailing entries mean None), a PartitionSpec, or the string 'fsdp_largest':
    shard the largest dim (the earlier one on ties) divisible by the 'fsdp' axis size over
    'fsdp'. FSDP_RULES = [('.*', 'fsdp_largest')] is "FSDP everything" in one line.
  * scalars and 1-D leaves are always replicated (tiny; sharding them only adds collectives).
  * a dim that is not divisible by the size of its mesh axes is replicated instead, with a
    logged warning (not an error: the same rule list should work on 8 CPU devices and a pod).
"""

import logging
import re

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')
FSDP_LARGEST = 'fsdp_largest'
FSDP_RULES = [('.*', FSDP_LARGEST)]


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, model) sizes of the mesh over ``num_devices``; one axis may be -1 (the devices left over; data=-1
    by default, data=1 fsdp=-1 is FSDP over everything); the product must equal the device count."""
    cfg, n = dict(mesh_config or {}), num_devices
    sizes = {a: int(cfg.get(a, -1 if a == 'data' else 1)) for a in AXES}
    rest = [a for a, v in sizes.items() if v == -1]
    if len(rest) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f'Invalid mesh config {sizes}: each axis must be >= 1, and at most one may be -1.')
    if rest:
        known = int(np.prod([v for a, v in sizes.items() if a != rest[0]]))
        if n % known:
            raise ValueError(
                f'mesh axes other than {rest[0]} multiply to {known}, which does not divide the {n} available devices.'
            )
        sizes[rest[0]] = n // known
    data, fsdp, model = (sizes[a] for a in AXES)
    if data * fsdp * model != n:
        raise ValueError(
            f'mesh data*fsdp*model = {data}*{fsdp}*{model} = {data * fsdp * model} '
            f'but there are {n} devices; set one axis (e.g. mesh.data) to -1 to use all of them.'
        )
    return data, fsdp, model


def make_mesh(mesh_config=None, devices=None) -> Mesh:
    """Mesh ('data','fsdp','model') over ``devices`` (default: all), sized by ``mesh_shape``."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def path_to_str(path) -> str:
    """'/'-joined key path, e.g. '0/mu/encoder/layers/mssa/qkv/kernel'."""
    return jax.tree_util.keystr(path, simple=True, separator='/')


def _canonical(entries) -> P:
    """PartitionSpec without trailing Nones, so equal placements compare equal."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _fsdp_largest(shape, mesh) -> P:
    """Shard the largest dim divisible by the fsdp size over 'fsdp' (earlier dim on ties)."""
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):  # sorted() is stable
        if shape[i] % mesh.shape['fsdp'] == 0:
            return _canonical([None] * i + ['fsdp'])
    return P()


def _dim_axes(path, dim, axes, regex, mesh):
    """`axes` for a dim of size `dim`, or None (with a warning) if they do not divide it."""
    if axes is None:
        return None
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes  # ConfigDicts give lists
    names = axes if isinstance(axes, tuple) else (axes,)
    for a in names:
        if a not in mesh.shape:
            raise ValueError(f'Rule {regex!r}: {a!r} is not a mesh axis {AXES}.')
    size = int(np.prod([mesh.shape[a] for a in names]))
    if dim % size:
        log.warning(
            'sharding: %s dim of size %d is not divisible by mesh axes %s (size %d); replicating that dim.',
            path,
            dim,
            axes,
            size,
        )
        return None
    return axes


def spec_for(path: str, shape, rules, mesh) -> P:
    """The PartitionSpec of one leaf: first matching rule, divisibility-checked."""
    if len(shape) < 2:
        return P()
    for regex, spec in rules:
        if not re.search(regex, path):
            continue
        if isinstance(spec, str):
            if spec != FSDP_LARGEST:
                raise ValueError(f'Unknown sharding spec {spec!r} in rule {regex!r}.')
            return _fsdp_largest(shape, mesh)
        if len(spec) > len(shape):
            raise ValueError(
                f'Rule {regex!r} gives spec {tuple(spec)} with {len(spec)} entries to {path!r} of shape {tuple(shape)}.'
            )
        return _canonical(_dim_axes(path, d, a, regex, mesh) for d, a in zip(shape, spec))
    return P()


def param_shardings(tree, rules, mesh):
    """Tree of NamedSharding matching `tree` (arrays or ShapeDtypeStructs); see module doc."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_to_str(path), np.shape(leaf), rules, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dim split over ('data','fsdp'); remaining dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_local_to_global(batch, mesh):
    """Per-host batch dict (numpy, leading dim = global_batch / process_count) -> global arrays.

    Each host passes only its own rows; the global leading dim is local * process_count.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
