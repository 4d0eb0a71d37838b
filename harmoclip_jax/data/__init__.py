"""Datasets (TFDS builders), lexeme extraction and grain pipelines."""
