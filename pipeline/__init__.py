"""Data, preprocessing, embedding cache, training, evaluation and reporting."""

from pipeline.numerics import pin_numerics
from pipeline.runtime import passive_openmp_waits

# Before anything loads torch, numpy and their libraries, which read these settings once:
# the OpenMP wait policy, and the kernel choices that make CPU numbers machine-independent.
passive_openmp_waits()
pin_numerics()
