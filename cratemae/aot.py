"""Ahead-of-time compilation of the real train step for a TPU slice, on any machine that has libtpu installed.

With libtpu importable, ``jax.experimental.topologies.get_topology_desc`` returns compile-only TPU devices for any
slice shape; a mesh over them plus ``jax.jit(...).lower(ShapeDtypeStruct...).compile()`` runs the TPU compiler on
the host CPU. No TPU, network or credentials are needed (measured: docs/scale_out.md). The compiled
program then tells, per device:

  memory    arguments, outputs (the donated state aliases its output), temporaries and XLA's heap-simulated peak,
            held against the chip's HBM. A program whose temporaries cannot fit fails in the compiler itself with
            RESOURCE_EXHAUSTED, as it would on the TPU; one that compiles fits when its peak is within HBM.
            argument + output - alias + temporaries is shown as an upper bound (it can exceed the peak).
  FLOPs     XLA's ``cost_analysis()['flops']`` counts the body of every while loop once: the ``nn.scan`` over
            layers (so it reads about 1/depth of the truth) and, on small meshes, the SPMD partitioner's windowed
            einsum loops. The analytic count of cratemae.flops (train = 3 x forward matmuls) is the one to trust.

The step is built exactly as the engine (cratemae.train.engine.run) builds it for the config's task, pretraining or
fine-tuning (same model, optimizer, state shardings from the config's regex rules, batch split over ('data', 'fsdp'),
donated state), so the numbers describe the program a pod would run. Slices are named as gcloud names them (v4-32,
v5litepod-256 or v5e-256, v5p-128, v6e-256) or as libtpu does (v4:2x2x4, v5e:16x16, v5:4x4x4, v6e:16x16).
"""

import dataclasses
import glob
import importlib.util
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from cratemae import flops
from cratemae import sharding
from cratemae.train import engine
from cratemae.train import tasks

GIB = 2**30
# HBM per JAX device in GiB: v4 and v5p run one device per chip (megacore), v5e and v6e have one core per chip.
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
# gcloud generation prefix -> (libtpu topology prefix, chip config, gcloud counts cores (2 per chip) or chips).
_GENERATIONS = {
    'v4': ('v4', 'megacore', 2),
    'v5p': ('v5', 'megacore', 2),
    'v5e': ('v5e', None, 1),
    'v5litepod': ('v5e', None, 1),
    'v6e': ('v6e', None, 1),
}
_LIBTPU_PREFIX = {'v4': 'v4', 'v5': 'v5p', 'v5p': 'v5p', 'v5e': 'v5e', 'v6e': 'v6e'}  # libtpu prefix -> generation
# Chip grids of the standard slices (as MaxText's accelerator_to_spec_map lists them).
_GRIDS_3D = {
    4: '2x2x1',
    8: '2x2x2',
    16: '2x2x4',
    32: '2x4x4',
    64: '4x4x4',
    128: '4x4x8',
    256: '4x8x8',
    512: '8x8x8',
    1024: '8x8x16',
    2048: '8x16x16',
}
_GRIDS_2D = {4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: gcloud accelerator type, libtpu topology name, number of JAX devices, HBM per device."""

    name: str  # e.g. 'v4-32'
    generation: str  # 'v4' | 'v5e' | 'v5p' | 'v6e'
    topology: str  # libtpu name, e.g. 'v4:2x2x4'
    chip_config: str | None  # 'megacore' for v4 / v5p (one JAX device per chip), else None
    devices: int

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GIB


def _standard_slices():
    out = {}
    for gen, (prefix, chip_config, per_chip) in _GENERATIONS.items():
        grids = _GRIDS_3D if chip_config else _GRIDS_2D
        for chips, grid in grids.items():
            name = f'{gen}-{chips * per_chip}'
            generation = _LIBTPU_PREFIX[prefix]
            out[name] = Slice(name, generation, f'{prefix}:{grid}', chip_config, chips)
    return out


SLICES = _standard_slices()


def valid_names() -> str:
    """The slice names accepted, for error messages."""
    names = sorted(n for n in SLICES if not n.startswith('v5litepod'))
    return ', '.join(names) + '; v5litepod-N = v5e-N; or a libtpu topology such as v5e:16x16, v4:2x2x4, v5:4x4x4'


def resolve_slice(name: str) -> Slice:
    """A Slice from 'v4-32' / 'v5litepod-256' / 'v5e:16x16' / 'v5:4x4x4' (= 'v5p:4x4x4'); ValueError lists the
    valid names otherwise."""
    name = name.strip()
    if name in SLICES:
        return SLICES[name]
    m = re.fullmatch(r'(v4|v5p|v5e|v5|v6e):(\d+(?:x\d+){1,2})', name)
    if m:
        generation = _LIBTPU_PREFIX[m.group(1)]
        prefix = {'v5p': 'v5'}.get(generation, generation)
        chip_config = 'megacore' if generation in ('v4', 'v5p') else None
        dims = [int(d) for d in m.group(2).split('x')]
        if (len(dims) == 3) == (chip_config is not None):  # v4/v5p grids are 3-D, v5e/v6e grids 2-D
            return Slice(name, generation, f'{prefix}:{m.group(2)}', chip_config, int(np.prod(dims)))
    raise ValueError(f'Unknown TPU topology {name!r}. Valid: {valid_names()}.')


def libtpu_available() -> bool:
    return importlib.util.find_spec('libtpu') is not None


def _has_local_tpu() -> bool:
    return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def topology_devices(tpu_slice: Slice):
    """The compile-only TPU devices of `tpu_slice` (needs libtpu, not a TPU)."""
    if not libtpu_available():
        raise RuntimeError(
            f"libtpu is not installed; AOT compilation for TPU needs it: pip install 'jax[tpu]=="
            f"{jax.__version__}'  (or pip install -e '.[tpu]')."
        )
    if not _has_local_tpu():
        # libtpu's lockfile keeps two processes off the same chips. With no chip on this machine a compile-only
        # load guards nothing, and without this a second concurrent user (another AOT run, a test) fails with
        # "Internal error when accessing libtpu multi-process lockfile". Must be set before libtpu loads.
        os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    kwargs = {'chip_config_name': tpu_slice.chip_config} if tpu_slice.chip_config else {}
    try:
        devices = topologies.get_topology_desc(platform='tpu', topology_name=tpu_slice.topology, **kwargs).devices
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError(INVALID_ARGUMENT) for bad shapes
        raise ValueError(
            f'libtpu rejects topology {tpu_slice.topology!r}: {str(e).strip().splitlines()[0]}\nValid: {valid_names()}.'
        ) from None
    if len(devices) != tpu_slice.devices:
        raise RuntimeError(f'{tpu_slice.topology} gave {len(devices)} devices, expected {tpu_slice.devices}.')
    return devices


def build_train_step(config, devices):
    """(jitted train step, abstract (state, batch) with shardings, mesh): what the engine compiles for the config's
    task (``tasks.task_name``: pretraining, or fine-tuning for a finetune_* entry).

    The mesh is ``sharding.make_mesh``'s, whichever axis holds the -1; ValueError from engine.validate_config (e.g. a
    global batch that does not split over the devices) comes before tracing.
    """
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    process_count = len({d.process_index for d in devices})
    engine.settle_config(config, mesh, process_count)
    program = tasks.build_program(config, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
        for k, v in program.task.train_batch_shapes(config.train.global_batch).items()
    }
    return program.train_step, (program.abstract_state, batch), mesh


@dataclasses.dataclass
class Report:
    """Per-device figures of one compiled train step (bytes, FLOPs, seconds)."""

    slice: Slice
    mesh: dict
    global_batch: int
    fits: bool
    lower_s: float = 0.0
    compile_s: float = 0.0
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    peak: int = 0
    code: int = 0
    xla_flops: float | None = None
    analytic_flops: float = 0.0
    error: str | None = None  # the compiler's out-of-memory message when it refused

    @property
    def total(self) -> int:
        """argument + output - alias + temp: an upper bound on the HBM the step holds (donated state counted once)."""
        return self.argument + self.output - self.alias + self.temp


def _is_oom(error) -> bool:
    text = str(error).lower()
    return 'resource_exhausted' in text or 'exceeds available hbm' in text or 'ran out of memory' in text


def compile_report(config, tpu_slice: Slice, devices=None) -> Report:
    """Lowers and compiles the train step of `config` for `tpu_slice`; returns the memory/FLOP report.

    A compile that fails for lack of HBM gives fits=False with the compiler's message; any other error raises.
    """
    devices = topology_devices(tpu_slice) if devices is None else devices
    train_step, args, mesh = build_train_step(config, devices)
    batch = config.train.global_batch
    report = Report(
        tpu_slice,
        dict(mesh.shape),
        batch,
        fits=True,
        analytic_flops=flops.train_flops(config.model, batch) * batch / len(devices),
    )
    t0 = time.perf_counter()
    lowered = train_step.lower(*args)
    report.lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:
        if not _is_oom(e):
            raise
        report.compile_s = time.perf_counter() - t0
        report.fits, report.error = False, str(e).strip().splitlines()[0]
        return report
    report.compile_s = time.perf_counter() - t0
    mem = memory_analysis(compiled)
    report.argument, report.output, report.alias, report.temp = (
        mem['argument'],
        mem['output'],
        mem['alias'],
        mem['temp'],
    )
    report.peak, report.code = mem['peak'], mem['generated_code']
    report.xla_flops = xla_flops(compiled)
    # The compiler refuses a program whose temporaries exceed HBM (handled above); past that, XLA's heap-simulated
    # peak is the figure to hold against HBM. argument + output - alias + temp can exceed it (measured: 19.8 GiB
    # against a 13.4 GiB peak on v5e, accepted by the compiler), so it is shown as an upper bound only.
    report.fits = report.peak <= tpu_slice.hbm_bytes
    return report


def memory_analysis(compiled) -> dict:
    """XLA's per-device memory plan of a compiled program, in bytes: argument, output, alias, temp, generated_code,
    peak (XLA's heap-simulated peak; 0 where the backend does not report it)."""
    m = compiled.memory_analysis()
    keys = ('argument', 'output', 'alias', 'temp', 'generated_code')
    out = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in keys}
    out['peak'] = int(getattr(m, 'peak_memory_in_bytes', 0))
    return out


def xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled program (each while-loop body counted once), or None."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax, a dict in 0.10
    return float(cost['flops']) if cost and 'flops' in cost else None


def _gib(n) -> str:
    return f'{n / GIB:.2f} GiB' if n >= GIB / 10 else f'{n / 2**20:.1f} MiB'


def format_report(r: Report, name: str = '') -> str:
    """Human-readable lines for one report."""
    s = r.slice
    hbm = HBM_GIB[s.generation]
    lines = [
        (
            f'{name} on {s.name} ({s.topology}, {s.devices} devices, {hbm} GiB HBM each), mesh {r.mesh}, '
            f'global batch {r.global_batch} ({r.global_batch // s.devices} per device)'
        ),
        f'  lower {r.lower_s:.1f} s, compile {r.compile_s:.1f} s',
    ]
    if r.error:
        lines.append(f'  DOES NOT FIT: the compiler refused: {r.error}')
        return '\n'.join(lines)
    flops_text = 'n/a'
    if r.xla_flops:
        flops_text = (
            f'{r.xla_flops:.4g} (x{r.xla_flops / r.analytic_flops:.3f}; XLA counts each while-loop body, '
            'e.g. the layer scan, once)'
        )
    lines += [
        (
            f'  per device: arguments {_gib(r.argument)}, outputs {_gib(r.output)} (aliased {_gib(r.alias)}), '
            f'temporaries {_gib(r.temp)}, code {_gib(r.code)}'
        ),
        (
            f'  XLA peak {_gib(r.peak)} of {hbm} GiB HBM = {100 * r.peak / s.hbm_bytes:.0f}%; upper bound '
            f'arguments + outputs - aliased + temporaries {_gib(r.total)}'
        ),
        f'  FLOPs per device and step: analytic {r.analytic_flops:.4g}, XLA cost analysis {flops_text}',
        '  FITS' if r.fits else f'  DOES NOT FIT in {hbm} GiB HBM per device (XLA peak)',
    ]
    if r.fits and r.total > s.hbm_bytes:
        lines[-1] += (
            " by XLA's peak, but the upper bound exceeds HBM: little headroom, confirm on hardware (or use "
            'remat / a smaller batch).'
        )
    return '\n'.join(lines)
