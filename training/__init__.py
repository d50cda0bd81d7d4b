"""Datasets, models, partitions and the local training loop, shared by the server's workers and the client."""
