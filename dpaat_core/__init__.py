"""DPAAT Lab: robust medical image classification with Dynamic Perturbation-Adaptive
Adversarial Training. Submodules: ``data``, ``models``, ``attacks``."""

__version__ = "0.1.0"
