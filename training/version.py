"""What a client and a server must agree on (docs/protocol.md, "Versions"). Free of torch.

``VERSION`` is this release of the project: the server and the reference client with its
``training/`` code, which must compute what the server's workers expect. ``PROTOCOL_VERSION``
numbers the messages of docs/protocol.md. A client states both in ``register``; the server
refuses one it cannot work with (``upgrade_required``) instead of letting it fail shards.
"""

from __future__ import annotations

import re

VERSION = "0.2.0"
#: 2: ``register`` carries ``protocol_version`` and ``client_version``; the server acknowledges
#: every ``task_result`` (``result_accepted``), which the reference client waits for; a client
#: may ``rotate_token``. (1: the specification's messages, without them.)
PROTOCOL_VERSION = 2
#: The oldest protocol this server still speaks.
MIN_PROTOCOL_VERSION = 2
#: The oldest reference client whose ``training/`` computes what this server's workers expect;
#: the server's ``MIN_CLIENT_VERSION`` defaults to it.
MIN_CLIENT_VERSION = "0.2.0"

VERSION_RE = re.compile(r"^(\d{1,6})\.(\d{1,6})\.(\d{1,6})$")


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.2.3"`` -> ``(1, 2, 3)``; raises ValueError on anything else."""
    found = VERSION_RE.match(text)
    if found is None:
        raise ValueError(f"{text[:32]!r} is not a version of the form MAJOR.MINOR.PATCH")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch
