"""Networks: frozen CT/PET foundation-model encoders and the DeepMTS+DAFT survival network."""

from pipeline.numerics import pin_numerics

# Before torch computes: the CPU kernels that give the same bits on every AVX2 machine.
pin_numerics()
