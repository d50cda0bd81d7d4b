"""Seeds of a round's random draws, from a hash of what they belong to (torch-free)."""

from __future__ import annotations

import hashlib


def noise_seed(seed: int, round_seed: int, name: str, block: int) -> int:
    """The generator seed of one noise block: a hash of the round, tensor name and block
    index, so the noise of an element does not depend on how the model was sliced."""
    h = hashlib.blake2b(f"{seed}\x1f{round_seed}\x1f{name}\x1f{block}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1
