"""Fuzz targets and their runner (see fuzz/README.md). Not part of the installed package."""
