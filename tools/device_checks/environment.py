"""Stage 1 of tools/device_run.py, in its own process: what the machine is and whether every module imports.

  python -m tools.device_checks.environment      prints one JSON line

Device kind and platform, the driver (nvidia-smi), the versions of the stack, free device and host memory, and an
import of every module of cratemae, launch and experiments (a module that fails names the missing package or API)."""

import importlib
import importlib.metadata
import json
import os
import pkgutil
import platform
import subprocess
import sys

PACKAGES = (
    'jax',
    'jaxlib',
    'jax-cuda13-plugin',
    'jax-cuda12-plugin',
    'flax',
    'optax',
    'orbax-checkpoint',
    'chex',
    'numpy',
    'torch',
    'ml_collections',
    'grain',
    'array_record',
    'tensorboardX',
    'mlxtend',
    'tensorflow-datasets',
    'matplotlib',
    'pillow',
)
ROOTS = ('cratemae', 'launch', 'experiments')
# Packages the device run does not carry (tools/device_wheels.sh): the modules that need them are listed apart.
NOT_CARRIED = ('tensorflow_datasets',)


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def nvidia_smi() -> dict:
    query = 'name,driver_version,memory.total,memory.free,clocks.max.sm,power.limit'
    try:
        text = subprocess.run(
            ['nvidia-smi', f'--query-gpu={query}', '--format=csv,noheader'],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return {'nvidia_smi': f'unavailable: {type(e).__name__}'}
    return {'nvidia_smi': dict(zip(query.split(','), (v.strip() for v in text.split(','))))} if text else {}


def import_all() -> dict:
    """{module: error} for every module under ROOTS that fails to import (empty when all import)."""
    failed, not_carried, count = {}, {}, 0
    for root in ROOTS:
        package = importlib.import_module(root)
        for info in pkgutil.walk_packages(package.__path__, root + '.'):
            if info.name.endswith('__main__'):
                continue
            count += 1
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as e:
                if (e.name or '').split('.')[0] in NOT_CARRIED:
                    not_carried[info.name] = e.name
                else:
                    failed[info.name] = f'{type(e).__name__}: {e}'[:300]
            except Exception as e:  # noqa: BLE001 - the point is to list every failure, not stop at the first
                failed[info.name] = f'{type(e).__name__}: {e}'[:300]
    return {
        'modules_imported': count - len(failed) - len(not_carried),
        'import_failures': failed,
        'modules_needing_uncarried_packages': not_carried,
    }


def main():
    import jax  # after versions(): a broken jax still leaves the versions recorded by the caller's traceback

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    free = stats['bytes_limit'] - stats['bytes_in_use'] if 'bytes_limit' in stats else None
    with open('/proc/meminfo') as f:
        host_free_kib = next((int(line.split()[1]) for line in f if line.startswith('MemAvailable')), None)
    record = {
        'device_kind': device.device_kind,
        'platform': device.platform,
        'num_devices': jax.device_count(),
        'versions': {**versions(), 'python': platform.python_version()},
        'device_free_gib': None if free is None else round(free / 2**30, 2),
        'host_available_gib': None if host_free_kib is None else round(host_free_kib / 2**20, 1),
        'cpu_count': os.cpu_count(),
        'loadavg': os.getloadavg(),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        **nvidia_smi(),
        **import_all(),
    }
    print(json.dumps(record, default=str), flush=True)
    return 0 if not record['import_failures'] else 1


if __name__ == '__main__':
    sys.exit(main())
