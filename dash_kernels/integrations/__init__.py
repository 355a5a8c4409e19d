"""Adapters for other trainers (optional dependencies, imported lazily): `dash_kernels.integrations.trl`."""
