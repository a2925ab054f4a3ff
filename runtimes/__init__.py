"""Execution of fcpass graphs: backends, schedulers, the sampling host loop and the cache policies."""
