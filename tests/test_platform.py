"""The CPU runtime settings of cratemae/platform.py: when they apply, that they respect the user, that they act."""

import json
import os
import subprocess
import sys

import pytest

from cratemae import platform as cpu_platform

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LINUX = {'system': 'Linux', 'libc': 'glibc', 'thp': True}


def test_adds_the_tunable_on_a_linux_cpu():
    env = cpu_platform.cpu_tunables_env({'PATH': '/bin'}, **_LINUX)
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
    assert env['PATH'] == '/bin'
    assert env['CRATEMAE_CPU_TUNING_APPLIED'] == '1'


def test_keeps_the_users_other_tunables():
    env = cpu_platform.cpu_tunables_env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, **_LINUX)
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize(
    'environ, machine',
    [
        ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, _LINUX),  # the user's own hugetlb choice wins
        ({'CRATEMAE_CPU_TUNING': '0'}, _LINUX),  # opt-out
        ({'CRATEMAE_CPU_TUNING_APPLIED': '1'}, _LINUX),  # already re-executed: never loop
        ({'JAX_PLATFORMS': 'cuda'}, _LINUX),  # not a CPU run
        ({'JAX_PLATFORMS': 'tpu'}, _LINUX),
        ({}, dict(_LINUX, system='Darwin')),
        ({}, dict(_LINUX, libc='')),  # musl or unknown C library: no glibc tunables
        ({}, dict(_LINUX, thp=False)),  # transparent huge pages 'never'
    ],
)
def test_leaves_the_environment_alone(environ, machine):
    assert cpu_platform.cpu_tunables_env(environ, **machine) is None


@pytest.mark.parametrize('platforms', ['cpu', 'cuda,cpu', ' CPU '])
def test_applies_when_jax_platforms_names_the_cpu(platforms):
    assert cpu_platform.cpu_tunables_env({'JAX_PLATFORMS': platforms}, **_LINUX) is not None


def test_thp_mode_parsing(tmp_path):
    for text, ok in [
        ('always [madvise] never', True),
        ('[always] madvise never', True),
        ('always madvise [never]', False),
    ]:
        (tmp_path / 'enabled').write_text(text + '\n')
        assert cpu_platform._thp_available(str(tmp_path / 'enabled')) is ok
    assert cpu_platform._thp_available(str(tmp_path / 'missing')) is False


def _applies_here():
    return cpu_platform.cpu_tunables_env({}) is not None


# A jitted function whose temporary buffer (two 36 MB intermediates) is allocated afresh at every call, as the train
# step's is; it prints the minor page faults per call.
_FAULTS = """
from cratemae import platform
platform.reexec_with_cpu_tunables()
import json, os, resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(jnp.sin(x) @ x + 1).sum())
x = jnp.ones((3000, 3000))
f(x).block_until_ready(); f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3): f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3
print(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES', ''), 'faults': faults}))
"""


def _run(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'CRATEMAE_CPU_TUNING_APPLIED')}
    env.update(JAX_PLATFORMS='cpu', **extra_env)
    out = subprocess.run(
        [sys.executable, '-c', _FAULTS], cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _applies_here(), reason='needs Linux, glibc and transparent huge pages (madvise or always)')
def test_reexec_sets_the_tunable_and_cuts_page_faults():
    tuned, plain = _run({}), _run({'CRATEMAE_CPU_TUNING': '0'})
    assert 'glibc.malloc.hugetlb=1' in tuned['tunables']
    assert plain['tunables'] == ''
    # 72 MB of fresh mappings per call: ~17,600 faults in 4 KiB pages; a few hundred with huge pages (measured).
    assert plain['faults'] > 10_000
    assert tuned['faults'] < plain['faults'] / 5
