"""Searching merge coefficients and masks on data (`python -m jmerge.search`)."""
