"""Reporting: the comparison table and the figures."""
