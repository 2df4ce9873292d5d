"""Per-tensor PRNG keys: key = fold_in(key(seed), first 4 bytes of sha256(output tensor name)),
so a stochastic method draws the same bits whatever the order, mode or sharding of the merge."""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def tensor_key(seed: int, name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), np.uint32(name_hash(name)))
