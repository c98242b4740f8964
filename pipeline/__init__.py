"""Data, preprocessing, embedding cache, training, evaluation and reporting."""
