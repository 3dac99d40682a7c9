"""Compression: block importance (which blocks go), base distances (which block each shares), the plan."""
