"""Rotary position tables, shared by every backend (computed on the host in numpy)."""
import numpy as np


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [m, head_dim/2] for NEOX rotation, computed in float32 as the reference does
    (inv_freq = 1 / theta^(2i/d); angle = position * inv_freq)."""
    inv = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    ang = positions.astype(np.float32)[:, None] * inv.astype(np.float32)[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
