"""Which clients this server works with: the versions a ``register`` states (docs/protocol.md,
"Versions"). Pure: no I/O.

A client that states no ``protocol_version`` was written to the specification's messages; it
is accepted, except for ``federated_training``, whose shards need the project's own
``training/`` code at a version the workers agree with. A reference client states both
versions; one that is too old (or speaks a newer protocol than this server) is refused with
``upgrade_required`` and what to upgrade, instead of failing shards later.
"""

from __future__ import annotations

from store.models import FEDERATED
from training.version import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, VERSION, parse_version

UPGRADE_CLIENT = "upgrade the client (docs/client.md, 'Install')"


def refusal(
    protocol_version: int | None,
    client_version: str | None,
    task_types: list[str] | None,
    min_client_version: str,
) -> str | None:
    """Why this server will not work with a client that registers so, or None when it will."""
    federated = task_types is not None and FEDERATED in task_types
    if protocol_version is None:
        if federated:
            return (
                f"{FEDERATED} needs a client that states protocol_version and client_version "
                f"(AI Farm client {min_client_version} or newer); {UPGRADE_CLIENT}"
            )
        return None
    if protocol_version > PROTOCOL_VERSION:
        return (
            f"this server (AI Farm {VERSION}) speaks protocol {PROTOCOL_VERSION}, older than your "
            f"client's {protocol_version}: upgrade the server, or run a client of version {VERSION}"
        )
    if protocol_version < MIN_PROTOCOL_VERSION:
        return (
            f"this server speaks protocol {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}, and your client "
            f"speaks {protocol_version}: {UPGRADE_CLIENT} to {min_client_version} or newer"
        )
    if client_version is None:
        if federated:
            return f"{FEDERATED} needs client_version in register; {UPGRADE_CLIENT}"
        return None
    if parse_version(client_version) < parse_version(min_client_version):
        return (
            f"client {client_version} is older than this server accepts (MIN_CLIENT_VERSION "
            f"{min_client_version}); {UPGRADE_CLIENT}"
        )
    return None
