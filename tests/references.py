"""Independent numpy float64 references for the method's formulas (softmax, KL), shared by tests."""
import numpy as np


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p, q):
    """KL(p || q) per row, natural log."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)
