"""How many trainings run at once, and on what: pipeline.runtime's choices."""

from __future__ import annotations

import os

import pytest

from pipeline import runtime


@pytest.mark.parametrize(
    "cpus,jobs,threads,expected", [(4, 5, 1, 4), (4, 3, 1, 3), (4, 5, 2, 2), (4, 5, 8, 1), (1, 5, 1, 1), (2, 0, 1, 1)]
)
def test_default_workers_fill_the_usable_cpus_and_never_exceed_the_jobs(monkeypatch, cpus, jobs, threads, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert runtime.usable_cpus() == cpus
    assert runtime.default_workers(jobs, threads, on_gpu=False) == expected
    assert runtime.default_workers(jobs, threads, on_gpu=True) == 1


def test_usable_cpus_is_the_affinity_mask_not_the_machine():
    assert runtime.usable_cpus() == len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2x"])
def test_thread_counts_are_checked_naming_the_value(bad):
    with pytest.raises((ValueError, TypeError), match=repr(bad) if not isinstance(bad, str) else None):
        runtime.check_threads(bad)


def test_embeddings_are_the_same_bytes_on_any_thread_count():
    """Under portable numerics both encoders give identical bytes on 1, 2, 3, 4 and 16 threads
    (demo input sizes, random-init weights), so an extraction's thread count decides nothing
    (on a 16-core x86 host the PET-FM's last bits had moved between one and two threads with
    each library's own kernels)."""
    import numpy as np
    import torch

    from pipeline import extraction as E

    rng = np.random.default_rng(0)
    sizes = {"ct": ((16, 64, 64), {}), "pet": ((64, 64, 64), {"img_size": 64, "window_size": 4})}
    for encoder, (dhw, config) in sizes.items():
        spec = E._make_spec(encoder, weights=None, random_init=True, seed=0, encoder_config=config, precision="fp32")
        model = E._build_encoder(spec)
        x = rng.random((2, 1, *dhw), dtype=np.float32)
        outs = {}
        for threads in (1, 2, 3, 4, 16):
            with runtime.compute_threads(threads):
                outs[threads] = E._forward(model, x, torch.device("cpu"), "fp32")
        differ = [n for n, out in outs.items() if out.tobytes() != outs[1].tobytes()]
        assert not differ, f"{encoder}: {differ} threads differ from one thread"


def test_deterministic_kernels_switch_torch_and_restore_it_without_loading_the_compiler():
    """In a fresh interpreter (the suite may have loaded the compiler): the block runs with
    deterministic algorithms in warn-only mode, the previous mode comes back after it, and
    torch's compiler (1 s of imports per training process) stays unloaded."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from pipeline.runtime import deterministic_kernels\n"
        "with deterministic_kernels():\n"
        "    inside = (torch.are_deterministic_algorithms_enabled(),"
        " torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic)\n"
        "after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)\n"
        "print(inside, after, 'torch._inductor' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(True,", "True,", "True)", "(False,", "False)", "False"], out.stdout


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_waits_passively_unless_the_user_chose(preset, expected):
    """`import pipeline` before torch leaves OMP_WAIT_POLICY at the user's value, or sets it
    to PASSIVE, where torch's OpenMP runtime (loaded after it) and child processes read it."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = (
        "import pipeline, os, subprocess, sys, torch\n"
        "print(os.environ['OMP_WAIT_POLICY'], subprocess.run([sys.executable, '-c', "
        "'import os; print(os.environ[\"OMP_WAIT_POLICY\"])'], capture_output=True, text=True).stdout.strip())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, expected]


def test_the_environment_record_holds_the_threads_in_force_not_a_setting():
    import torch

    before = torch.get_num_threads()
    with runtime.compute_threads(3):
        assert runtime.environment_record("cpu")["threads"] == 3
    assert runtime.environment_record("cpu")["threads"] == before == torch.get_num_threads()
