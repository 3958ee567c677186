"""Input and output: atomic file writing, BIDS ingestion of multi-echo GRE/SE series,
participants/sessions tables, and the naming of alsiron's derivatives."""
