"""Evaluation against ground truth (DESIGN.md §5 metrics, phantom truth comparison,
QSM-CI-style per-stage scores): for tests, benchmarks and studies — never on the
production path of a real run."""
