"""Process-level runtime settings that make the CPU train step cheaper, applied by the entry points.

Why: XLA:CPU (jaxlib 0.10) allocates each step's temporary buffer afresh (``CpuDeviceMemory`` ->
``posix_memalign``). The buffer is larger than glibc's largest mmap threshold (32 MiB), so glibc maps it with
``mmap`` and unmaps it on free: every step touches a fresh mapping page by page. For the default run
(crate_mae_mnist, batch 128) that is a 414 MiB buffer, about 106,000 minor page faults and 0.3 s of kernel time per
step, a quarter of the process's CPU time (measured; docs/performance.md). glibc's tunable
``glibc.malloc.hugetlb=1`` makes malloc advise transparent huge pages for its mappings, so the same buffer faults in
2 MiB pages: about 650 faults and 0.08 s per step.

glibc reads tunables once, when the process starts, so the setting cannot be made from inside a running Python.
``reexec_with_cpu_tunables`` therefore re-executes the same command once with GLIBC_TUNABLES extended, before jax is
imported. It leaves alone: a user's own ``glibc.malloc.hugetlb`` setting, a process whose JAX_PLATFORMS names no CPU,
non-Linux or non-glibc systems, systems with transparent huge pages off, and ``CRATEMAE_CPU_TUNING=0`` (opt out).
"""

import os
import platform as _platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
_OPT_OUT = 'CRATEMAE_CPU_TUNING'
_DONE = 'CRATEMAE_CPU_TUNING_APPLIED'  # set in the re-executed process, so it never re-executes twice
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def _uses_cpu(environ) -> bool:
    """False only when JAX_PLATFORMS pins jax to platforms other than the CPU."""
    names = [p.strip().lower() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
    return not names or 'cpu' in names


def _thp_available(path=_THP) -> bool:
    """Transparent huge pages in mode 'always' or 'madvise' (the tunable only madvises)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    return '[always]' in text or '[madvise]' in text


def cpu_tunables_env(environ, system=None, libc=None, thp=None):
    """The environment to re-execute with, or None when nothing should change.

    Args:
      environ: the current environment (a mapping).
      system, libc, thp: the OS name, the C library name and whether transparent huge pages can be advised
        (defaults: this machine's); parameters so the rule can be tested on any machine.
    """
    system = _platform.system() if system is None else system
    libc = _platform.libc_ver()[0] if libc is None else libc
    thp = _thp_available() if thp is None else thp
    if environ.get(_OPT_OUT, '1') == '0' or environ.get(_DONE):
        return None
    if system != 'Linux' or libc != 'glibc' or not thp or not _uses_cpu(environ):
        return None
    current = environ.get('GLIBC_TUNABLES', '')
    if 'glibc.malloc.hugetlb' in current:  # the user's own choice wins
        return None
    env = dict(environ)
    env['GLIBC_TUNABLES'] = f'{current}:{TUNABLE}' if current else TUNABLE
    env[_DONE] = '1'
    return env


def reexec_with_cpu_tunables(argv=None):
    """Re-executes this Python command once with the CPU tunables (see module doc); returns if nothing changes.

    Call it first thing in an entry point, before jax is imported: the re-executed process starts from scratch.
    ``argv`` defaults to ``sys.orig_argv`` (the interpreter's own argv, so ``python -m pkg.mod`` is preserved).
    """
    env = cpu_tunables_env(os.environ)
    if env is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
