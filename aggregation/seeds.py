"""Seeds of a round's random draws, from a hash of what they belong to (torch-free)."""

from __future__ import annotations

import hashlib

#: Seeds are 63-bit non-negative integers: they fit ``RoundOptions.round_seed``.
SEED_BITS = 63


def secret_round_seed(task_secret: int, round_no: int) -> int:
    """The ``round_seed`` of round ``round_no`` of a task whose noise secret (made by the server,
    stored in ``tasks.noise_secret``, never sent to a client) is ``task_secret``: a hash, so one
    round's seed tells nothing of another's, and nothing a client receives (its task's config,
    ``strategy_params.seed`` included) determines it."""
    h = hashlib.blake2b(f"{task_secret}\x1f{round_no}".encode(), digest_size=8, person=b"aifarm-round")
    return int.from_bytes(h.digest(), "little") >> (64 - SEED_BITS)


def noise_seed(seed: int, round_seed: int, name: str, block: int) -> int:
    """The generator seed of one noise block: a hash of the round, tensor name and block
    index, so the noise of an element does not depend on how the model was sliced."""
    h = hashlib.blake2b(f"{seed}\x1f{round_seed}\x1f{name}\x1f{block}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1
