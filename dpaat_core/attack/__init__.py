"""Attacks with a per-sample eps (FGSM, I-FGSM, PGD) and BatchNorm folding for the attack's forward passes."""
