"""Reusable widgets: the KV block map and the throughput chart."""
