"""How a process computes: its CPU threads, deterministic kernels, and the record of both.

Same input, same output. A float reduction split over two threads adds its terms in another
order than one thread does, so a training run's numbers depend on the thread count (a demo
fold's C-index moved by 0.05 between one and two threads). The thread count is therefore a
training setting with a fixed default (:data:`DEFAULT_THREADS`, ``TrainConfig.threads``),
applied by the code that trains whatever ``OMP_NUM_THREADS`` the shell has, and recorded with
everything else that can still change numbers (:func:`environment_record`: torch version,
CPU kernels, device, CUDA/cuDNN, TF32, precision).

One thread per training process is also the fast choice here: the networks this tool trains on
CPU are narrow, so a second thread buys little alone and costs a great deal beside another busy
process (OpenMP threads wait on each other at every parallel region). Parallelism comes from
processes instead: folds and cells in a pool (:mod:`pipeline.pool`), one thread each.

:func:`compute_threads` bounds torch's intra-op pool and, through threadpoolctl (the standard
tool for it), the OpenMP and BLAS pools of numpy, scipy and scikit-learn, and restores them
after. :func:`deterministic_kernels` asks torch for deterministic algorithms where it has them
(on CUDA it warns where it has none; see ``models.deepmts`` for the pooling path).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from threadpoolctl import threadpool_limits

from pipeline.numerics import numerics_record, warn_if_not_in_force

#: CPU threads of one training (and fitting) process unless the user says otherwise.
DEFAULT_THREADS = 1

#: cuBLAS needs a fixed workspace for reproducible matrix products (set before CUDA starts).
CUBLAS_WORKSPACE = ":4096:8"


def passive_openmp_waits() -> None:
    """Let OpenMP threads that wait for work sleep instead of spinning, unless the user chose.

    libgomp (torch's and scikit-learn's OpenMP) busy-waits between parallel regions by
    default; beside another busy process those spinning threads take the cores the work
    needs (a CT-FM batch on 2 threads: 0.27 s alone, 0.67 s beside one CPU-bound process,
    0.47 s passive, as fast as one thread; alone, passive costs nothing measurable). libgomp
    reads the setting when it loads, so this runs on ``import pipeline``, before torch;
    child processes inherit it. Numbers do not depend on it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a cluster job or
    ``taskset`` narrows), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def default_workers(jobs: int, threads: int, on_gpu: bool) -> int:
    """Processes to run ``jobs`` independent trainings in at once: as many as the usable CPUs
    hold at ``threads`` each (at least one, at most ``jobs``); one on a GPU, which a second
    training would share."""
    if on_gpu:
        return 1
    return max(1, min(jobs, usable_cpus() // check_threads(threads)))


def check_threads(threads: Any) -> int:
    """``threads`` as an int >= 1, or ``ValueError`` naming the value."""
    if isinstance(threads, bool) or int(threads) != threads or int(threads) < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return int(threads)


@contextmanager
def compute_threads(threads: int = DEFAULT_THREADS) -> Iterator[None]:
    """Run the block on ``threads`` CPU threads: torch intra-op, OpenMP and BLAS pools.

    Usable as a context manager or a decorator; the previous limits are restored after.
    """
    threads = check_threads(threads)
    # torch's pool only where torch is loaded already: a block that computes with it has
    # imported it, and numpy-only work (the classical peers) need not pay its import.
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


@contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Ask torch for deterministic algorithms in the block (warning where none exists).

    On CPU the kernels used here are deterministic already; on CUDA this selects cuDNN's
    deterministic convolutions, turns off its autotuner and fixes cuBLAS's workspace.
    """
    import torch  # local: see compute_threads

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    _use_deterministic_algorithms(torch, True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        _use_deterministic_algorithms(torch, before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def _use_deterministic_algorithms(torch: Any, mode: bool, warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms`` without its import of the compiler.

    The public call also sets ``torch._inductor.config.deterministic``, importing TorchDynamo
    and Inductor to do so: ~1.1 s in every training process, for a flag that only compiled
    code reads, and nothing here compiles. Where the compiler is loaded already (a caller
    compiles), or torch lacks the kernel switch, the public call is made.
    """
    switch = getattr(torch._C, "_set_deterministic_algorithms", None)
    if switch is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        switch(mode, warn_only=warn_only)


def _cuda_record(device: Any) -> dict[str, Any]:
    """GPU name, CUDA/cuDNN versions and the TF32 switches (None where CUDA is absent)."""
    import torch  # local: see compute_threads

    on_cuda = getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def environment_record(device: Any, precision: str = "fp32") -> dict[str, Any]:
    """Everything besides the inputs and settings that can change a run's numbers, as in force
    where it is called: call it inside the computation's :func:`compute_threads` and
    :func:`deterministic_kernels` blocks.

    Args:
        device: the resolved training device (``torch.device`` or its name).
        precision: ``"fp32"`` or the autocast dtype's name.

    Returns:
        JSON-ready dict: device, precision, threads (torch's intra-op threads in force,
        ``torch.get_num_threads()``, not the setting asked for), deterministic mode, torch and Python
        versions, what decides the CPU kernels (:func:`pipeline.numerics.numerics_record`:
        numerics mode and whether it is in force, the pins, the kernel levels of ATen, oneDNN,
        OpenBLAS and numpy, the MKL and oneDNN versions, the CPU's vendor, family/model/stepping,
        flags and caches) and the CUDA fields of :func:`_cuda_record`.
    """
    import torch  # local: see compute_threads

    record = {
        "device": str(device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "deterministic": bool(torch.are_deterministic_algorithms_enabled()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **numerics_record(),
        **_cuda_record(device),
    }
    warn_if_not_in_force(record)
    return record


#: What :func:`environment_record` holds that may differ between runs and change numbers on a
#: CPU, in the order the report shows them: the mode and kernels first, then the machine.
CPU_ENVIRONMENT_KEYS = (
    "device",
    "precision",
    "threads",
    "deterministic",
    "numerics",
    "numerics_in_force",
    "torch",
    "cpu_capability",
    "onednn",
    "onednn_isa",
    "mkl",
    "openblas",
    "numpy",
    "numpy_dispatch",
    "pins",
    "cpu",
    "cpu_vendor",
    "cpu_family_model_stepping",
    "cpu_flags",
    "cpu_caches",
)
#: The same, and the GPU's (:func:`_cuda_record`).
ENVIRONMENT_KEYS = CPU_ENVIRONMENT_KEYS + ("gpu", "cuda", "cudnn", "tf32_matmul", "tf32_cudnn")
