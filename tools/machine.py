"""The CPU a measurement ran on, as the records of tools/ name it (docs/ figures name the machine beside them)."""

import os
import platform


def cpu_model(with_isa=False) -> str:
    """/proc/cpuinfo's model name; with_isa adds the widest vector ISA and the vCPU count, e.g. 'AMD EPYC (AVX2, 2 vCPUs)'.

    XLA:CPU's kernels, and so the rounding of a trained number, differ between AVX2, AVX-512 and AMX machines."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            lines = f.readlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(':', 1)[1].strip() for line in lines if line.startswith('model name')]
    name = names[0] if names else platform.processor() or platform.machine()
    if not with_isa:
        return name
    flags = next((line.split(':', 1)[1].split() for line in lines if line.startswith('flags')), [])
    isa = 'AMX' if 'amx_tile' in flags else 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'SSE'
    return f'{name} ({isa}, {len(names) or os.cpu_count()} vCPUs)'
