"""Simulation: the numerical head phantom (geometry, tissue table, MEGRE/MESE forward
model, BIDS writer) and index-level trial cohorts."""
