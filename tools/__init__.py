"""Maintenance scripts (not the user CLI): python -m tools.NAME from the repository root."""
