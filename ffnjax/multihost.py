"""Several processes (hosts) training as one: starting `jax.distributed`, and
the few host-side agreements a multi-process run needs.

A multi-host run starts the same command on every host. Each process calls
`initialize` before JAX starts its backends, in one of two forms:

    initialize()                                       # the environment form: TPU pod,
                                                       # SLURM, Open MPI, Kubernetes
    initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # the explicit form

after which `jax.devices()` lists the devices of every process and a
`jax.jit` over a mesh of them runs its collectives across processes (gloo on
CPU, set here; NCCL / ICI on accelerators). The training loop
(`ffnjax.train_loop.train`) then needs three things on the host, all
collective (every process calls them at the same point, in the same order):

* `check_same_config`: every process runs the same configuration (a process
  started with other flags is named, not left to hang or diverge);
* `allgather_json`: each process's small JSON state (the sampler streams a
  checkpoint saves), and `check_same` (every process resumes the same step);
* `any_process`: a stop flag raised on one process (SIGTERM) seen by all, so
  they take one checkpoint at the same step.

Failures are bounded in time. `initialize` gives up after `timeout_s`
(default `INIT_TIMEOUT_S`, JAX's own default): when the coordinator never
answers or a process never joins, it prints one line `error: ...` naming the
coordinator, the process and the limit, and exits with status 2 (the XLA
client would otherwise abort the process with a C++ stack trace). A coordinator
port already in use is a ValueError naming the port. Once running, a process
that dies is noticed by the others after JAX's heartbeat timeout
(`HEARTBEAT_TIMEOUT_S`), which aborts them.

Inference does not use any of this: block-wise segmentation spreads over
hosts through Dask (`ffnjax.blockwise`), and `launch_reasons` tells a
segmenter it was started once per host by mistake. See docs/multihost.md.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any

__all__ = ["INIT_TIMEOUT_S", "HEARTBEAT_TIMEOUT_S", "initialize", "is_initialized",
           "allgather_json", "check_same_config", "check_same", "any_process", "launch_reasons"]

INIT_TIMEOUT_S = 300       # jax.distributed.initialize's own default
HEARTBEAT_TIMEOUT_S = 100  # JAX's default: a silent process is declared dead after this
_JAX_GRACE_S = 30          # JAX's own deadline comes this much later than ours


# ----------------------------------------------------------------------------
# Starting
# ----------------------------------------------------------------------------

def is_initialized() -> bool:
    """Whether `jax.distributed` has been initialised in this process."""
    from jax._src import distributed
    return distributed.global_state.client is not None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float = INIT_TIMEOUT_S) -> None:
    """Joins this process to a multi-process JAX run (a no-op when it has joined).

    Must run before anything starts JAX's backends (`jax.devices()`, any
    computation): `import ffnjax` does not, so call it first thing in a script.

    Args:
      coordinator: 'HOST:PORT' of process 0, which serves the coordination
        service there. None (with the other two None): the environment form,
        where JAX reads them from the cluster (Cloud TPU metadata, SLURM,
        Open MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS).
      num_processes, process_id: this run's process count and this process's
        index in it (0 is the coordinator).
      timeout_s: how long to wait for the coordinator and every other process.

    Raises:
      ValueError: naming the argument when only part of the explicit form is
        given or a value is out of range; naming the port when process 0
        cannot serve on it (in use); when JAX's backends already started.

    When the processes have not all joined after `timeout_s`, prints one line
    `error: ...` to stderr and ends the process with status 2 (`os._exit`:
    the native client it is waiting in cannot be interrupted).
    """
    import jax
    from jax._src import xla_bridge

    if is_initialized():
        return
    explicit = {"coordinator": coordinator, "num_processes": num_processes,
                "process_id": process_id}
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(f"the explicit multi-process form needs coordinator, num_processes "
                             f"and process_id together; missing {', '.join(missing)}")
        _host_port(coordinator)
        if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"process_id must lie in 0..num_processes-1, got process_id "
                             f"{process_id} with num_processes {num_processes}")
    if timeout_s <= 0:
        raise ValueError(f"the initialisation timeout must be positive, got {timeout_s}")
    if xla_bridge.backends_are_initialized():
        raise ValueError("jax.distributed must be initialised before JAX starts its backends "
                         "(before jax.devices() or any computation)")
    if coordinator is not None and int(process_id) == 0:
        _check_port_free(coordinator)
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Cross-process collectives on CPU (JAX's default today; older versions had none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    where = (f"process {process_id} of {num_processes}, coordinator {coordinator}"
             if coordinator is not None else "process count, id and coordinator from the "
             "environment")
    watchdog = threading.Timer(timeout_s, _give_up, args=(where, coordinator, process_id,
                                                           timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator, None if num_processes is None else int(num_processes),
                                   None if process_id is None else int(process_id),
                                   initialization_timeout=int(timeout_s) + _JAX_GRACE_S)
    except ValueError as e:                     # the environment form found no cluster
        raise ValueError(f"no multi-process cluster found in the environment "
                         f"(jax.distributed.initialize: {str(e).rstrip('.')}); give --coordinator, "
                         f"--num-processes and --process-id") from e
    except RuntimeError as e:                   # JaxRuntimeError: the service could not start
        if "Failed to start RPC server" in str(e):
            from jax._src import distributed
            raise _port_error(coordinator or str(distributed.global_state.coordinator_address)) from e
        raise
    finally:
        watchdog.cancel()


def _host_port(coordinator: str) -> tuple[str, int]:
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    return host.strip("[]"), int(port)


def _port_error(coordinator: str) -> ValueError:
    return ValueError(f"process 0 cannot serve the coordinator on port "
                      f"{coordinator.rpartition(':')[2]} (coordinator {coordinator}): the port is "
                      f"in use or cannot be bound; choose another port")


def _check_port_free(coordinator: str) -> None:
    """Raises `_port_error` when process 0 could not bind the coordinator's port
    on every interface, as the service will (checked here: a failed start of
    JAX's service can leave the process to crash at exit)."""
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
    port = _host_port(bind)[1] if bind else _host_port(coordinator)[1]
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue                               # no IPv6 here: try IPv4
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the service does
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind(address)
                return
            except OSError as e:
                raise _port_error(coordinator) from e


def _answers(coordinator: str | None) -> bool | None:
    """Whether anything accepts a TCP connection at `coordinator` (None: unknown)."""
    if coordinator is None:
        return None
    try:
        with socket.create_connection(_host_port(coordinator), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _give_up(where: str, coordinator: str | None, process_id: int | None, timeout_s: float):
    """The watchdog of `initialize`: one error line, exit status 2."""
    if process_id not in (None, 0) and _answers(coordinator) is False:
        why = (f"nothing answers at {coordinator}: is process 0 running, with this "
               f"--coordinator?")
    else:
        why = ("not every process joined: start all of them with the same --coordinator "
               "and --num-processes")
    print(f"error: multi-process start timed out after {timeout_s:g} s ({where}): {why} "
          f"(--init-timeout sets the limit)", file=sys.stderr, flush=True)
    os._exit(2)


# ----------------------------------------------------------------------------
# Agreeing across processes (collective: every process calls, in the same order)
# ----------------------------------------------------------------------------

def allgather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order; `[obj]` in
    a single-process run. Collective."""
    import jax
    if jax.process_count() == 1:
        return [obj]
    import numpy as np
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
    size = 1 << max(8, (longest - 1).bit_length())     # few distinct shapes: few compilations
    buf = np.zeros(size, np.uint8)
    buf[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in rows]


def check_same_config(config: Any, **extra: Any) -> None:
    """Raises ValueError on every process unless all processes run the same
    `config` (a TrainConfig) and `extra` values (e.g. stop_at_step); the
    message names the first process that differs and its differing fields.
    Collective; free in a single-process run."""
    import jax
    if jax.process_count() == 1:
        return
    mine = dict(config.to_dict(), **{f"({k})": v for k, v in extra.items()})
    every = allgather_json(mine)
    for index, other in enumerate(every[1:], start=1):
        fields = sorted(k for k in set(every[0]) | set(other) if every[0].get(k) != other.get(k))
        if fields:
            shown = "; ".join(f"{k}: {other.get(k)!r} vs {every[0].get(k)!r}" for k in fields[:4])
            raise ValueError(f"process {index} was started with a different configuration from "
                             f"process 0 ({shown}); start every process with the same flags")


def check_same(what: str, value: Any, hint: str = "") -> None:
    """Raises ValueError on every process unless all see the same `value`
    (JSON-serialisable), naming `what`, the first process that differs and
    `hint`. Collective; free in a single-process run."""
    every = allgather_json(value)
    for index, other in enumerate(every[1:], start=1):
        if other != every[0]:
            raise ValueError(f"process {index} sees {what} {other!r} but process 0 sees "
                             f"{every[0]!r}" + (f"; {hint}" if hint else ""))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any. Collective."""
    import jax
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


# ----------------------------------------------------------------------------
# Inference: one process drives the cluster
# ----------------------------------------------------------------------------

def launch_reasons() -> list[str]:
    """Why this process looks like one of several copies of one command: the
    JAX process count when `jax.distributed` runs, and the launcher variables
    that start a command once per host or task (empty: a single launch).

    Checked: JAX_COORDINATOR_ADDRESS (set), SLURM_STEP_NUM_TASKS,
    OMPI_COMM_WORLD_SIZE and PMI_SIZE (more than one task), TPU_WORKER_HOSTNAMES
    and TPU_PROCESS_ADDRESSES (more than one host).
    """
    reasons = []
    if "jax" in sys.modules:
        import jax
        if is_initialized() and jax.process_count() > 1:
            reasons.append(f"jax.process_count() is {jax.process_count()}")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        reasons.append(f"JAX_COORDINATOR_ADDRESS={os.environ['JAX_COORDINATOR_ADDRESS']}")
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            reasons.append(f"{name}={value}")
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        hosts = [h for h in os.environ.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            reasons.append(f"{name} lists {len(hosts)} hosts")
    return reasons
