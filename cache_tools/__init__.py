"""Teacher side: build, inspect and verify the teacher cache (HDF5 shards + manifest)."""

__version__ = "0.1.0"
