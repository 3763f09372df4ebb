"""Latency and importance tables, keyed by the entries of a MergeSpace."""
