"""Multi-process start-up: a thin wrapper over `jax.distributed.initialize`.

On TPU pods (and SLURM / Open MPI clusters jax recognises) no arguments are needed. Elsewhere pass
them, or set JMERGE_COORDINATOR (host:port), JMERGE_NUM_PROCESSES, JMERGE_PROCESS_ID. With one
process and nothing set this does nothing, so single-machine runs need no flags.
"""

from __future__ import annotations

import os

import jax

from jmerge.errors import JmergeError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    coordinator = coordinator or os.environ.get("JMERGE_COORDINATOR")
    if num_processes is None and os.environ.get("JMERGE_NUM_PROCESSES"):
        num_processes = int(os.environ["JMERGE_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JMERGE_PROCESS_ID"):
        process_id = int(os.environ["JMERGE_PROCESS_ID"])
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit and None in (coordinator, num_processes, process_id):
        raise JmergeError("multi-process start needs all of coordinator, num_processes, process_id "
                          "(or JMERGE_COORDINATOR / JMERGE_NUM_PROCESSES / JMERGE_PROCESS_ID)")
    if explicit:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU devices of different processes talk through gloo collectives.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
    elif _on_cluster():
        jax.distributed.initialize()


def _on_cluster() -> bool:
    """Environments where jax can discover its peers by itself."""
    return any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                          "MEGASCALE_COORDINATOR_ADDRESS"))
