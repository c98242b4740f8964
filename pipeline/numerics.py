"""What decides a CPU computation's last bits, pinned so that every x86-64 CPU with AVX2 adds
in the same order.

A float sum's last bits depend on the order of its terms, and the CPU libraries choose that
order from the machine: torch's ATen kernels and oneDNN's convolutions pick their vector width
from the CPU's instruction sets (AVX-512 where present), MKL picks a code path per CPU, numpy
dispatches its own SIMD loops, and OpenBLAS picks kernels per core type. On one AVX-512
machine, a demo fold's unbiased C-index moved between 0.667 and 0.742 with nothing changed but
the kernels the shell asked those libraries for: after 90 Adam steps at the demo's learning
rate, rounding is a different network.

:data:`PORTABLE_PINS` fixes each of those choices to the AVX2 path, which every x86-64 CPU
since 2013 (Intel Haswell, AMD Zen) runs. The libraries read the variables when they load or
first compute, so :func:`pin_numerics` runs on ``import pipeline`` and ``import models``,
before torch or numpy load, and overrides whatever the shell set (child processes inherit
them). ``HNFM_NUMERICS=native`` in the shell leaves the libraries to choose (faster on some
CPUs, machine-dependent numbers); the run records say which mode was in force.

oneDNN also sizes its blocking from the cache sizes; with the pins in force a demo fold's
bytes were the same on this machine and on an emulated Haswell with other cache sizes and no
AVX-512 (``benchmarks/portable_numerics.md``).

:func:`numerics_record` reads the state actually in force (what torch, oneDNN, OpenBLAS and
numpy report, not only the variables) and the CPU facts that decide kernels, so two records
that differ say why. A GPU keeps its own numerics (cuDNN, cuBLAS; see
:mod:`pipeline.runtime`); the CPU pins still govern what runs on its host's CPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The shell variable that chooses the mode: "portable" (default) or "native".
NUMERICS_ENV = "HNFM_NUMERICS"
NUMERICS_MODES = ("portable", "native")

#: Variable -> value that makes each library's kernels those of the AVX2 path, on any
#: x86-64 CPU with AVX2. Read by the library when it loads or first computes.
PORTABLE_PINS: dict[str, str] = {
    # torch's vectorised ATen kernels (batch norm, reductions, element-wise).
    "ATEN_CPU_CAPABILITY": "avx2",
    # oneDNN, torch's convolutions: the AVX2 JIT kernels.
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # MKL, torch's BLAS: conditional numerical reproducibility on the AVX2 branch, strict
    # (the same results for any thread count and memory alignment).
    "MKL_CBWR": "AVX2,STRICT",
    # numpy's and scipy's OpenBLAS: the Haswell (AVX2) kernels.
    "OPENBLAS_CORETYPE": "Haswell",
    # numpy's own SIMD dispatch: nothing above AVX2 (names of numpy 2.x and 1.x; unknown
    # names are ignored).
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_KNL "
    "AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL",
}

#: CPU flags (``/proc/cpuinfo``) that decide which kernels a library would pick by itself.
KERNEL_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
)


class NumericsWarning(UserWarning):
    """Portable numerics were asked for but a library computes with its own choice."""


def numerics_mode() -> str:
    """The mode the shell chose (:data:`NUMERICS_ENV`), or ``ValueError`` naming the value."""
    mode = os.environ.get(NUMERICS_ENV, "portable").strip().lower() or "portable"
    if mode not in NUMERICS_MODES:
        raise ValueError(f"{NUMERICS_ENV} must be one of {NUMERICS_MODES}, got {mode!r}")
    return mode


def pin_numerics() -> str:
    """Set :data:`PORTABLE_PINS` in this process's environment (whatever the shell set),
    unless the shell chose ``HNFM_NUMERICS=native``. Returns the mode.

    Runs on ``import pipeline`` and ``import models``; a library loaded earlier (numpy or
    torch imported first, and computing) keeps its own choice, which :func:`numerics_record`
    reports and :func:`warn_if_not_in_force` warns about.
    """
    mode = numerics_mode()
    if mode == "portable":
        os.environ.update(PORTABLE_PINS)
    return mode


# -- the state in force ---------------------------------------------------------------------


def _torch_config() -> dict[str, str | None]:
    """oneDNN and MKL versions from ``torch.__config__.show()``."""
    import torch

    out: dict[str, str | None] = {"onednn": None, "mkl": None}
    for line in torch.__config__.show().splitlines():
        line = line.strip(" -")
        if "MKL-DNN" in line or "oneDNN" in line:
            out["onednn"] = line.split(" v", 1)[-1].split(" ")[0] if " v" in line else line
        elif "Math Kernel Library" in line:
            out["mkl"] = line.split("Version ", 1)[-1].split(" for ")[0] if "Version " in line else line
    return out


@contextlib.contextmanager
def _stdout_to(path: Path):
    """Point file descriptor 1 (where oneDNN prints) at ``path`` for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "wb") as fh:
        os.dup2(fh.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


@lru_cache(maxsize=1)
def onednn_isa() -> str | None:
    """The instruction set oneDNN's kernels use in this process (its verbose header's
    ``isa:``), or None where oneDNN is absent or says nothing.

    oneDNN prints that header with the first primitive it runs verbosely: one tiny
    channels-last convolution, with its output caught from file descriptor 1.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    # A batch of two channels-last volumes: torch sends smaller ones to its own kernels.
    x = torch.zeros(2, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    w = torch.zeros(8, 8, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "onednn.txt"
        with _stdout_to(path), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            torch.nn.functional.conv3d(x, w, padding=1)
        for line in path.read_text(errors="replace").splitlines():
            if ",isa:" in line:
                return line.split(",isa:", 1)[1].strip()
    return None


def _openblas() -> list[dict[str, Any]]:
    """numpy's and scipy's OpenBLAS: version and the core type each computes for. Both are
    loaded first, so the record does not depend on what the process happened to import."""
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_info

    found = [
        {"library": Path(i["filepath"]).name, "version": i.get("version"), "core_type": i.get("architecture")}
        for i in threadpool_info()
        if i.get("internal_api") == "openblas"
    ]
    return sorted(found, key=lambda b: b["library"])  # load order varies between processes


def _numpy_dispatch() -> list[str]:
    """numpy's SIMD dispatch targets enabled in this process (highest last)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath
    return [t for t in umath.__cpu_dispatch__ if umath.__cpu_features__.get(t)]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` ({} where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    return fields


def _cache_sizes() -> dict[str, str]:
    """CPU 0's caches from sysfs, e.g. ``{"L1d": "48K", "L2": "2048K", "L3": "491520K"}``."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        with contextlib.suppress(OSError):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            name = f"L{level}" + ("d" if kind == "Data" else "")
            sizes[name] = (index / "size").read_text().strip()
    return sizes


def cpu_record() -> dict[str, Any]:
    """The CPU facts that decide kernels: vendor, family/model/stepping, name, the flags of
    :data:`KERNEL_FLAGS` it has, and its cache sizes."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family_model_stepping": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
        "cpu_caches": _cache_sizes(),
    }


def numerics_record() -> dict[str, Any]:
    """The numerics in force in this process and what decides them (JSON-ready).

    Fields: ``numerics`` (mode), ``numerics_in_force`` (every library computes on the pinned
    path), ``pins`` (the variables as set), ``cpu_capability`` (torch's ATen kernel level),
    ``onednn`` and ``onednn_isa``, ``mkl``, ``openblas`` (version and core type of each),
    ``numpy_dispatch`` and the :func:`cpu_record` fields.
    """
    import numpy
    import torch

    record = {
        "numerics": numerics_mode(),
        "pins": {k: os.environ.get(k) for k in PORTABLE_PINS},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **_torch_config(),
        "onednn_isa": onednn_isa(),
        "openblas": _openblas(),
        "numpy": numpy.__version__,
        "numpy_dispatch": _numpy_dispatch(),
        **cpu_record(),
    }
    record["numerics_in_force"] = not not_in_force(record)
    return record


def not_in_force(record: dict[str, Any]) -> list[str]:
    """Where a portable-mode record's libraries compute on another path than the pins' ([]
    in native mode or when all hold)."""
    if record.get("numerics") != "portable":
        return []
    off = []
    if "avx2" in record.get("cpu_flags", ["avx2"]):
        if record.get("cpu_capability") != "AVX2":
            off.append(f"torch's ATen kernels at {record.get('cpu_capability')}, not AVX2")
        isa = (record.get("onednn_isa") or "AVX2").upper()
        if "AVX2" not in isa or "512" in isa or "AMX" in isa or "VNNI" in isa:
            off.append(f"oneDNN at {record.get('onednn_isa')!r}, not AVX2")
    for blas in record.get("openblas", []):
        if blas.get("core_type") not in (None, "Haswell"):
            off.append(f"{blas['library']} on core type {blas['core_type']}, not Haswell")
    above = [t for t in record.get("numpy_dispatch", []) if "512" in t or t == "X86_V4"]
    if above:
        off.append(f"numpy dispatching {above}")
    return off


def warn_if_not_in_force(record: dict[str, Any]) -> None:
    """Warn, naming each library, where portable numerics were asked for but not obtained
    (a library loaded and computed before ``import pipeline``)."""
    off = not_in_force(record)
    if off:
        warnings.warn(
            "portable numerics are not in force: " + "; ".join(off) + ". Import pipeline (or "
            "models) before numpy and torch, or run through the project's commands, so the "
            "pins are set before the libraries load.",
            NumericsWarning,
            stacklevel=2,
        )
