"""Which clients the server works with (app/compat.py, docs/protocol.md "Versions")."""

from __future__ import annotations

import pytest

from app.compat import refusal
from app.protocol import ProtocolError, parse
from tests.unit.test_protocol import HW, frame
from training.version import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, VERSION, parse_version

FED = ["federated_training"]


def test_a_current_reference_client_is_accepted() -> None:
    assert refusal(PROTOCOL_VERSION, VERSION, FED, VERSION) is None


def test_a_specification_client_without_versions_gets_other_task_types() -> None:
    assert refusal(None, None, None, VERSION) is None
    assert refusal(None, None, ["shell"], VERSION) is None


def test_federated_training_needs_stated_versions() -> None:
    why = refusal(None, None, FED, "0.2.0")
    assert why is not None and "protocol_version and client_version" in why and "0.2.0 or newer" in why
    why = refusal(PROTOCOL_VERSION, None, FED, "0.2.0")
    assert why is not None and "client_version" in why


def test_an_older_client_is_told_to_upgrade_the_client() -> None:
    why = refusal(PROTOCOL_VERSION, "0.1.9", FED, "0.2.0")
    assert why == (
        "client 0.1.9 is older than this server accepts (MIN_CLIENT_VERSION 0.2.0); "
        "upgrade the client (docs/client.md, 'Install')"
    )
    # Compared as numbers, not as text: 0.10.0 is newer than 0.2.0.
    assert refusal(PROTOCOL_VERSION, "0.10.0", FED, "0.2.0") is None


def test_an_old_protocol_is_told_to_upgrade_the_client() -> None:
    why = refusal(MIN_PROTOCOL_VERSION - 1, VERSION, None, VERSION)
    assert why is not None and "upgrade the client" in why and f"speaks {MIN_PROTOCOL_VERSION - 1}" in why


def test_a_newer_protocol_is_told_to_upgrade_the_server() -> None:
    why = refusal(PROTOCOL_VERSION + 1, "9.0.0", FED, VERSION)
    assert why is not None and "upgrade the server" in why


def test_register_carries_both_versions() -> None:
    msg = parse(frame(type="register", **HW, protocol_version=2, client_version="1.20.3"))
    assert (msg.protocol_version, msg.client_version) == (2, "1.20.3")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"protocol_version": "two"}, "register.protocol_version must be an integer"),
        ({"protocol_version": 0}, "register.protocol_version must be an integer in 1..1000000"),
        ({"client_version": "latest"}, "register.client_version must be a version of the form MAJOR"),
        ({"client_version": "1.2.3" * 10}, "register.client_version must be a version of the form"),
    ],
)
def test_malformed_versions_are_refused_with_the_field(extra: dict[str, object], words: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse(frame(type="register", **HW, **extra))
    assert refused.value.code == "invalid_message"
    assert words in refused.value.message


def test_versions_compare_as_numbers() -> None:
    assert parse_version("0.10.0") > parse_version("0.9.9")
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR\.PATCH"):
        parse_version("1.2")


def test_the_package_version_is_the_one_clients_state() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert project["version"] == VERSION
