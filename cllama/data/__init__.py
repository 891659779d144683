"""Notebook 02, datasets: corpora and templates (`corpus`), fill-in-the-middle (`fim`), MindRecord
files (`mindrecord`) and `prepare(kind, ...)` (`prepare`)."""
