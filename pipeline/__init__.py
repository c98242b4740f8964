"""Data, preprocessing, embedding cache, training, evaluation and reporting."""

from pipeline.runtime import passive_openmp_waits

# Before anything loads torch (and its OpenMP runtime), which reads the wait policy once.
passive_openmp_waits()
