"""Training: the objectives (ERM, PGD-AT, TRADES, DPAAT), DPAAT's eps memory, the loop, DDP and validation."""
