"""The reference volunteer client: ``python -m client --server http://HOST:PORT``. See docs/client.md."""
