"""Field stage: brain masks (BET surface model, magnitude threshold), phase unwrapping and
multi-echo field fitting — from MEGRE magnitude and phase to the total field [ppm]."""
