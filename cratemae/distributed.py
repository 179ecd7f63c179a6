"""Distributed start-up: when the environment asks for several JAX processes, join them before anything else.

A pod slice (one process per host), SLURM, Open MPI or an explicit coordinator address each announce a
multi-process job through the environment; ``maybe_initialize_distributed`` reads it and calls
``jax.distributed.initialize`` once. A plain process or a single-host TPU VM matches nothing and stays alone.
The placement of arrays over the devices that start-up reveals is ``cratemae.sharding``'s business.
"""

import logging
import os

import jax

log = logging.getLogger(__name__)


def _more_than_one(value) -> bool:
    """'4' -> True; 'h0,h1' (a host list) -> True; '1', 'localhost', '' or junk -> False."""
    value = value.strip()
    return int(value) > 1 if value.isdigit() else len([h for h in value.split(',') if h]) > 1


# Counts / host lists that ask for multi-process JAX (JAX then auto-detects the rest).
_MULTI_PROCESS_ENV = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_NUM_SLICES', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def distributed_request(env=None):
    """(reason, kwargs for jax.distributed.initialize) if the environment asks for several
    processes, else None. Checked in order:
      CRATEMAE_COORDINATOR_ADDRESS (+ CRATEMAE_NUM_PROCESSES, CRATEMAE_PROCESS_ID): explicit.
      JAX_COORDINATOR_ADDRESS set: JAX's own variable (JAX reads it itself).
      TPU_WORKER_HOSTNAMES listing more than one host: a multi-host TPU slice.
      MEGASCALE_NUM_SLICES > 1: multi-slice TPU.   SLURM_NTASKS > 1 (with SLURM_JOB_ID): SLURM.
      OMPI_COMM_WORLD_SIZE > 1: Open MPI.
    A single-host TPU VM or a plain process matches none of them and stays single-process.
    """
    env = os.environ if env is None else env
    if env.get('CRATEMAE_COORDINATOR_ADDRESS'):
        kw = {'coordinator_address': env['CRATEMAE_COORDINATOR_ADDRESS']}
        for key in ('num_processes', 'process_id'):
            if f'CRATEMAE_{key.upper()}' in env:
                kw[key] = int(env[f'CRATEMAE_{key.upper()}'])
        return 'CRATEMAE_COORDINATOR_ADDRESS', kw
    if env.get('JAX_COORDINATOR_ADDRESS'):
        return 'JAX_COORDINATOR_ADDRESS', {}
    for var in _MULTI_PROCESS_ENV:
        if _more_than_one(env.get(var, '')) and (var != 'SLURM_NTASKS' or 'SLURM_JOB_ID' in env):
            return f'{var}={env[var]}', {}
    return None


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, env=None) -> bool:
    """Initialise multi-process JAX when asked to (arguments or environment, see
    `distributed_request`); returns True if JAX runs distributed afterwards.

    Must run before anything touches jax.devices(). Calling it twice is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address is not None:
        reason, kw = (
            'arguments',
            {'coordinator_address': coordinator_address, 'num_processes': num_processes, 'process_id': process_id},
        )
    else:
        request = distributed_request(env)
        if request is None:
            return False
        reason, kw = request
    log.info('jax.distributed.initialize(%s) because of %s', kw, reason)
    jax.distributed.initialize(**kw)
    return True
