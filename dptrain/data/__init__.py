"""Data layer: bundled corpus, user-data loading, and per-record LM tokenization."""

from dptrain.data.lm import IGNORE_INDEX, LMExamples, SequenceTooLongError, tokenize
from dptrain.data.loading import DataError, TextDataset, bundled_path, load_texts, split

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "LMExamples",
    "SequenceTooLongError",
    "TextDataset",
    "bundled_path",
    "load_texts",
    "split",
    "tokenize",
]
