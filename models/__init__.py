"""Networks: frozen CT/PET foundation-model encoders and the DeepMTS+DAFT survival network."""
