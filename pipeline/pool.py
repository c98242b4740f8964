"""The one executor of process pools: preprocessing, study cells and peers, the demo cohort.

:class:`JobPool` runs :class:`Job` objects in this process or in a pool of fresh worker
processes and yields one :class:`Done` per job as it finishes. Every user gets the same:

* **Failure naming.** A job that raises comes back as a :class:`JobFailed` naming its key
  and carrying the original error (``"Type: message"``, the traceback text and, when it could
  travel back, the exception object). A worker that dies (killed, out of memory) fails the
  jobs it had taken, each named: ``"worker process died (killed or out of memory?): ..."``.
* **Progress.** Each :class:`Done` carries :func:`progress_of` over the jobs of that run
  (done, total, elapsed, remaining); :func:`format_progress` words it; ``bar=`` draws a tqdm
  bar from the same count.
* **Warnings once.** A job's warnings and warning-level log records come back to this
  process and are shown once per run (:func:`show_notices`), not once per job and worker.

The start method is ``spawn`` unless a caller asks otherwise: a clean interpreter, safe with
torch/CUDA, OpenMP and ITK thread-pool state in the parent, and the only way a worker can set
``CUDA_VISIBLE_DEVICES`` before CUDA starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import importlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

#: How a failure says that the worker running the job is gone.
WORKER_DIED = "worker process died (killed or out of memory?)"


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(*args, **kwargs)``; picklable when it runs in a pool.

    Attributes:
        key: names the job in failures and progress (a case id, ``<split>/<peer>``, ...).
        fn: a module-level function.
        args, kwargs: its arguments.
        ident: fields a caller's failure record carries so callbacks see the same names as
            on success (e.g. ``{"cell": key}``).
    """

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    ident: dict[str, Any] = field(default_factory=dict)

    def failure(self, error: str, trace: str | None = None) -> dict[str, Any]:
        """A result dict for a failed job: ``ident`` plus ``key``, ``error``, ``traceback``."""
        return self.ident | {"key": self.key, "error": error, "traceback": trace}


class JobFailed(RuntimeError):
    """A job raised, or its worker died.

    Attributes:
        key: the job's key.
        error: ``"Type: message"`` of the original error (or :data:`WORKER_DIED` and the
            pool's error).
        trace: the traceback text from where the job ran, when there is one.
        original: the original exception object, when it could travel back (else None).
    """

    def __init__(self, key: str, error: str, trace: str | None = None, original: BaseException | None = None):
        super().__init__(f"{key}: {error}")
        self.key, self.error, self.trace, self.original = key, error, trace, original

    @property
    def worker_died(self) -> bool:
        return self.error.startswith(WORKER_DIED)


@dataclass
class Done:
    """One finished job: its value or its failure, and the progress of the run so far."""

    job: Job
    value: Any = None
    failed: JobFailed | None = None
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed is None

    def result(self) -> Any:
        """The job's value; raises its :class:`JobFailed` (caused by the original error)."""
        if self.failed is not None:
            raise self.failed from self.failed.original
        return self.value


def progress_of(done: int, total: int, elapsed: float) -> dict[str, Any]:
    """``{"done", "total", "elapsed_s", "remaining_s"}``; remaining from the mean rate so far."""
    remaining = elapsed / done * (total - done) if done else None
    return {"done": done, "total": total, "elapsed_s": elapsed, "remaining_s": remaining}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_progress(progress: dict[str, Any]) -> str:
    """``"3/13, 1m02s elapsed, ~3m20s left"`` from :func:`progress_of`."""
    text = f"{progress['done']}/{progress['total']}, {_duration(progress['elapsed_s'])} elapsed"
    if progress.get("remaining_s") is not None and progress["done"] < progress["total"]:
        text += f", ~{_duration(progress['remaining_s'])} left"
    return text


# --- warnings and log records of a job --------------------------------------------------


class _NoticeHandler(logging.Handler):
    """Keeps a job's warning-level log records (instead of printing them where it runs)."""

    def __init__(self, notices: list[tuple]):
        super().__init__(logging.WARNING)
        self.notices = notices

    def emit(self, record: logging.LogRecord) -> None:
        self.notices.append(("log", record.name, record.getMessage(), record.levelno, None))


def _travels(exc: BaseException) -> BaseException | None:
    """The exception itself when it pickles (to come back from a worker), else None."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any pickling problem: send the text only
        return None
    return exc


def _call(job: Job) -> tuple[Any, list[tuple], tuple | None]:
    """Run one job where it is: ``(value, notices, error)``; ``error`` is None or
    ``(exception or None, "Type: message", traceback text)``."""
    notices: list[tuple] = []
    handler = _NoticeHandler(notices)
    logging.getLogger().addHandler(handler)
    value, error = None, None
    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                value = job.fn(*job.args, **job.kwargs)
            except Exception as exc:  # noqa: BLE001 - one failing job must not stop the others
                error = (_travels(exc), f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        logging.getLogger().removeHandler(handler)
    notices += [
        ("warning", f"{w.category.__module__}:{w.category.__qualname__}", str(w.message), w.filename, w.lineno)
        for w in caught
    ]
    return value, notices, error


def show_notices(notices: Sequence[tuple], shown: set[tuple]) -> None:
    """Re-emit a job's warnings and log records here, each distinct one once per ``shown`` set.

    Args:
        notices: ``(kind, category or logger, message, filename or level, lineno)`` from a
            job's run.
        shown: the (kind, category or logger, message) already shown in this run; updated.
    """
    for kind, source, message, where, line in notices:
        if (kind, source, message) in shown:
            continue
        shown.add((kind, source, message))
        if kind == "log":
            logging.getLogger(source).log(where, message)
        else:
            warnings.warn_explicit(message, _warning_class(source), where, line)


def _warning_class(name: str) -> type[Warning]:
    """``"module:QualName"`` -> the warning class (UserWarning when it cannot be imported)."""
    module, _, qual = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return UserWarning
    return obj if isinstance(obj, type) and issubclass(obj, Warning) else UserWarning


# --- the pool -----------------------------------------------------------------------------

#: Linux prctl option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Make this worker end when ``parent`` does, however the parent ends (even SIGKILL).

    On Linux the kernel sends SIGTERM when the parent goes (prctl PR_SET_PDEATHSIG); elsewhere,
    and as a second line, a daemon thread checks every second that the parent is still ours.
    A worker left behind would finish its queued jobs and then sit idle holding its memory.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this libc: the watch thread remains
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A pool worker's first act: tie its life to the parent's, then the caller's initializer."""
    _die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def pinned_worker(slots: Any, threads: int, quiet: Sequence[type[Warning]] = ()) -> None:
    """An initializer for a :class:`JobPool` of workers that may use a GPU.

    Pins this worker to the GPU it takes from ``slots`` through ``CUDA_VISIBLE_DEVICES``,
    bounds torch's CPU threads and ignores the warning categories in ``quiet`` (ones the
    parent states once itself).

    The GPU is set before torch is loaded in the worker: this module does not import torch,
    torch is imported below only after ``CUDA_VISIBLE_DEVICES`` is set, and a worker runs its
    initializer before it unpickles its first job (whose module, e.g. :mod:`pipeline.study`,
    may import torch). Keep this function in a module that does not import torch.

    Args:
        slots: a queue of GPU ids, one taken per worker as it starts (``None`` = no pinning).
        threads: torch intra-op threads of the worker.
        quiet: warning categories ignored in the worker.
    """
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    for category in quiet:
        warnings.filterwarnings("ignore", category=category)
    import torch  # after CUDA_VISIBLE_DEVICES: torch reads it when CUDA starts

    torch.set_num_threads(threads)


class JobPool:
    """Runs jobs here (``in_process``) or in ``workers`` worker processes; a context manager.

    One pool can serve several :meth:`run` calls, so worker start-up is paid once.

    Args:
        workers: pool size (>= 1).
        in_process: run the jobs one by one in this process instead (no pool).
        start_method: multiprocessing start method (``"spawn"``: see the module docstring).
        initializer, initargs: run once in each worker as it starts.
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        in_process: bool = False,
        start_method: str = "spawn",
        initializer: Callable[..., None] | None = None,
        initargs: tuple = (),
    ):
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.in_process = in_process
        self.context = mp.get_context(start_method)
        self._initializer, self._initargs = initializer, initargs
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> JobPool:
        if not self.in_process:
            self._pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=self.context,
                initializer=_start_worker,
                initargs=(os.getpid(), self._initializer, self._initargs),
            )
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._pool is None:
            return
        if exc_type is not None:
            # Interrupted (Ctrl-C, an error in the caller): stop the running jobs now rather
            # than let the workers finish them. Jobs write atomically, so nothing is half-made.
            self.terminate_workers()
        self._pool.shutdown(wait=exc_type is None, cancel_futures=True)
        self._pool = None

    def terminate_workers(self) -> None:
        """Send SIGTERM to every live worker of the pool (no-op without a pool)."""
        # The executor keeps its processes in a private dict; there is no public way to stop
        # jobs that have started.
        processes = getattr(self._pool, "_processes", None) or {}
        for process in list(processes.values()):
            if process.is_alive():
                process.terminate()

    def run(
        self, jobs: Sequence[Job], *, shown: set[tuple] | None = None, bar: str | None = None, unit: str = "job"
    ) -> Iterator[Done]:
        """Yield one :class:`Done` per job, in completion order (submission order here).

        Leaving the loop early (e.g. raising on the first failure) cancels the jobs not yet
        started; jobs already finished keep what they wrote.

        Args:
            jobs: the work.
            shown: warnings and log records already shown in this run (see
                :func:`show_notices`); pass one set to several runs to show each once in all.
            bar: a tqdm bar with this description; None = no bar.
            unit: the bar's unit.
        """
        if self._pool is None and not self.in_process:
            raise RuntimeError("JobPool.run outside its `with` block: no worker pool started")
        shown = set() if shown is None else shown
        t0, count = time.perf_counter(), 0
        progress_bar = tqdm(total=len(jobs), desc=bar, unit=unit, disable=bar is None)

        def done(job: Job, value: Any, notices: list[tuple], error: tuple | None) -> Done:
            nonlocal count
            count += 1
            show_notices(notices, shown)
            progress_bar.update(1)
            failed = None if error is None else JobFailed(job.key, error[1], error[2], error[0])
            return Done(job, value, failed, progress_of(count, len(jobs), time.perf_counter() - t0))

        try:
            if self._pool is None:
                for job in jobs:
                    yield done(job, *_call(job))
                return
            futures = {self._pool.submit(_call, job): job for job in jobs}
            try:
                for fut in cf.as_completed(futures):
                    job = futures[fut]
                    try:
                        outcome = fut.result()
                    except cf.process.BrokenProcessPool as exc:  # each job the dead worker took
                        died = f"{WORKER_DIED}: {type(exc).__name__}: {exc}"
                        outcome = (None, [], (None, died, None))
                    except Exception as exc:  # noqa: BLE001 - e.g. a value that cannot be pickled
                        outcome = (None, [], (exc, f"{type(exc).__name__}: {exc}", None))
                    yield done(job, *outcome)
            finally:
                for fut in futures:
                    fut.cancel()
        finally:
            progress_bar.close()
