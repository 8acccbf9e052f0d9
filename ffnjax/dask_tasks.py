"""Running independent tasks on Dask, with a progress bar.

`ffnjax.blockwise` runs each of its phases as a list of independent tasks
(one per block or block pair). `engine` yields where they run: a
`dask.distributed` Client (a LocalCluster it starts, an existing Client, or a
scheduler address) or the name of one of Dask's local schedulers ('sync',
'threads', 'processes'); `run_tasks` runs ``fn(*args, **shared)`` for every
argument tuple there and returns the results in order. Values in `shared`
(the model) travel to each worker once (`Client.scatter(..., broadcast=True)`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import uuid
from typing import Any, Callable

import dask
from dask.callbacks import Callback
from distributed import Client, LocalCluster, as_completed
from tqdm.auto import tqdm

LOCAL_SCHEDULERS = ("sync", "synchronous", "single-threaded", "threads", "threading",
                    "processes", "multiprocessing")


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="block" if desc != "match" else "pair",
                disable=not enabled, dynamic_ncols=True)


def run_tasks(engine: Any, fn: Callable, args_list: list[tuple], *, desc: str, progress: bool,
              shared: dict | None = None, retries: int = 0) -> list:
    """Runs fn(*args, **shared) for every args tuple on the Dask engine, with a
    progress bar; returns the results in order. Failures propagate (tasks
    already finished have written their results)."""
    shared = dict(shared or {})
    if not args_list:
        return []
    with _progress(len(args_list), desc, progress) as bar:
        if isinstance(engine, str):
            class _Bar(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    bar.update(1)

            # _Call keeps the arguments opaque to dask.delayed (which would
            # otherwise take dataclasses such as Block apart).
            tasks = [dask.delayed(_Call(fn, args, shared), pure=False, traverse=False)()
                     for args in args_list]
            with _Bar():
                return list(dask.compute(*tasks, scheduler=engine))
        if shared:
            shared = {k: engine.scatter(v, broadcast=True, hash=False) for k, v in shared.items()}
        token = uuid.uuid4().hex[:8]
        futures = [engine.submit(fn, *args, **shared, key=f"{desc}-{token}-{i}", retries=retries,
                                 pure=False) for i, args in enumerate(args_list)]
        try:
            for fut in as_completed(futures):
                if fut.status == "error":
                    fut.result()  # raises the task's exception
                bar.update(1)
            return engine.gather(futures)
        finally:
            for f in futures:
                f.release()


class _Call:
    """fn(*args, **kwargs) as an opaque zero-argument callable."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self):
        return self.fn(*self.args, **self.kwargs)


@contextlib.contextmanager
def engine(client: Any, n_blocks: int, n_workers: int | None):
    """Yields a Dask Client or a local scheduler name.

    client: None -> a LocalCluster we start and stop; a `distributed.Client` ->
    used as is; 'sync'/'threads'/'processes' -> Dask's local schedulers; any
    other string -> a scheduler address to connect to.
    """
    if client is None:
        workers = n_workers or default_workers(n_blocks)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as c:
            yield c
    elif isinstance(client, str) and client in LOCAL_SCHEDULERS:
        yield client
    elif isinstance(client, str):
        with Client(client) as c:
            yield c
    else:
        yield client


def runs_in_parallel(client: Any, n_blocks: int, n_workers: int | None) -> bool:
    """Whether `engine(client, n_blocks, n_workers)` runs several tasks at once
    on this machine: a LocalCluster of more than one worker, or Dask's local
    'threads' / 'processes' schedulers. (A Client or an address: unknown, False.)"""
    if client is None:
        return (n_workers or default_workers(n_blocks)) > 1
    return isinstance(client, str) and client in ("threads", "threading", "processes", "multiprocessing")


def default_workers(n_blocks: int) -> int:
    """One single-threaded worker process per CPU core on a CPU machine; one per
    GPU/TPU device otherwise (processes sharing an accelerator would compete for
    its memory). Devices are counted from /dev so that the driver process does
    not initialise JAX (and claim accelerator memory) itself."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        devices = 0
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        devices = len([d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    else:
        devices = len(glob.glob("/dev/nvidia[0-9]*")) or len(glob.glob("/dev/accel[0-9]*"))
    per = devices or (os.cpu_count() or 1)
    return max(1, min(per, n_blocks))
