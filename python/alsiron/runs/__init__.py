"""Per-visit run loops, one module per command (phantom, qsm, relax, roi, demo): short I/O
loops over the pure stages, testable without the command line."""
