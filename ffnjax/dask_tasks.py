"""Running independent tasks on Dask, with a progress bar.

`ffnjax.blockwise` runs each of its phases as a list of independent tasks
(one per block or block pair). `engine` yields where they run: a
`dask.distributed` Client (a LocalCluster it starts, an existing Client, or a
scheduler address) or the name of one of Dask's local schedulers ('sync',
'threads', 'processes'); `run_tasks` runs ``fn(*args, **shared)`` for every
argument tuple there and returns the results in order. Values in `shared`
(the model) travel to each worker once (`Client.scatter(..., broadcast=True)`).

A task that raises is tried again, up to `retries` more times, where it runs
(`_Attempts`); one that still fails does not stop the others. When all have
run, `run_tasks` raises `TasksFailed`, naming each failed task (its label: the
block) and its error, so everything that could finish has (a block-wise run
keeps each finished block in its work folder, and a rerun computes only the
missing ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import traceback
import uuid
from typing import Any, Callable, Sequence

import dask
from dask.callbacks import Callback
from distributed import Client, LocalCluster, as_completed
from tqdm.auto import tqdm

LOCAL_SCHEDULERS = ("sync", "synchronous", "single-threaded", "threads", "threading",
                    "processes", "multiprocessing")


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit={"match": "pair", "pairs": "task"}.get(desc, "block"),
                disable=not enabled, dynamic_ncols=True)


@dataclasses.dataclass(frozen=True)
class TaskFailure:
    """A task that failed on every try: its label, the last error (type and
    one-line message), whether that error is a bad input (ValueError /
    OSError), its traceback, and the tries made."""

    label: str
    error: str
    bad_input: bool
    traceback: str
    tries: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TasksFailed(RuntimeError):
    """Some tasks of a phase failed on every try (the others finished)."""

    def __init__(self, desc: str, failures: Sequence[TaskFailure], total: int, hint: str = ""):
        self.desc, self.failures, self.total, self.hint = desc, list(failures), total, hint
        shown = "; ".join(f"{f.label}: {f.error}" for f in self.failures[:3])
        more = f"; and {len(self.failures) - 3} more" if len(self.failures) > 3 else ""
        tries = max(f.tries for f in self.failures)
        super().__init__(f"{len(self.failures)} of {total} {desc} tasks failed (tried {tries} "
                         f"time{'s' if tries > 1 else ''} each): {shown}{more}"
                         + (f"; {hint}" if hint else ""))

    @property
    def bad_input(self) -> bool:
        """Whether every failure is a bad input (ValueError / OSError)."""
        return all(f.bad_input for f in self.failures)


class _Attempts:
    """fn(*args, **kwargs), tried `tries` times; returns a TaskFailure instead of
    raising after the last (so one task's failure does not stop the others).
    KeyboardInterrupt and SystemExit pass through."""

    def __init__(self, fn: Callable, tries: int, label: str):
        self.fn, self.tries, self.label = fn, max(int(tries), 1), label

    def __call__(self, *args, **kwargs):
        for _ in range(self.tries):
            try:
                return self.fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (reported with its traceback)
                error, text = e, traceback.format_exc()
        return TaskFailure(self.label, _one_line(error), isinstance(error, (ValueError, OSError)),
                           text, self.tries)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def run_tasks(engine: Any, fn: Callable, args_list: list[tuple], *, desc: str, progress: bool,
              shared: dict | None = None, retries: int = 0,
              labels: Sequence[str] | None = None, hint: str = "") -> list:
    """Runs fn(*args, **shared) for every args tuple on the Dask engine, with a
    progress bar; returns the results in order.

    Each task is tried up to 1 + `retries` times. Raises `TasksFailed` (with
    `hint` at the end of its message) when some task failed every time,
    after all the others have run; `labels` name the tasks there (default
    '<desc> task <i>').
    """
    shared = dict(shared or {})
    if not args_list:
        return []
    labels = list(labels) if labels is not None else [f"{desc} task {i}" for i in range(len(args_list))]
    attempts = [_Attempts(fn, 1 + max(int(retries), 0), label) for label in labels]
    with _progress(len(args_list), desc, progress) as bar:
        if isinstance(engine, str):
            class _Bar(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    bar.update(1)

            # _Call keeps the arguments opaque to dask.delayed (which would
            # otherwise take dataclasses such as Block apart).
            tasks = [dask.delayed(_Call(call, args, shared), pure=False, traverse=False)()
                     for call, args in zip(attempts, args_list)]
            with _Bar():
                results = list(dask.compute(*tasks, scheduler=engine))
        else:
            results = _run_distributed(engine, attempts, args_list, shared, desc, retries, bar)
    failures = [r for r in results if isinstance(r, TaskFailure)]
    if failures:
        raise TasksFailed(desc, failures, len(args_list), hint)
    return results


def _run_distributed(client, attempts, args_list, shared, desc, retries, bar) -> list:
    """The tasks on a distributed Client; a task lost with its worker (after
    Dask's own `retries`) comes back as a TaskFailure."""
    if shared:
        shared = {k: client.scatter(v, broadcast=True, hash=False) for k, v in shared.items()}
    token = uuid.uuid4().hex[:8]
    futures = [client.submit(call, *args, **shared, key=f"{desc}-{token}-{i}", retries=retries,
                             pure=False) for i, (call, args) in enumerate(zip(attempts, args_list))]
    try:
        results = [None] * len(futures)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in as_completed(futures):
            i = index[fut.key]
            if fut.status == "error":
                e = fut.exception()
                results[i] = TaskFailure(attempts[i].label, _one_line(e), False,
                                         "".join(traceback.format_exception(e)), 1 + retries)
            else:
                results[i] = fut.result()
            bar.update(1)
        return results
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
