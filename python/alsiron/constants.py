"""Physical constants fixed by DESIGN.md."""

#: Gyromagnetic ratio of 1H over 2π, in Hz/T (42.577478 MHz/T).
GAMMA_BAR_HZ_PER_T: float = 42.577478e6
