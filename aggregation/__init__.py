"""Pure torch aggregation strategies over plain state dicts. No Flask, Celery or SQL."""
