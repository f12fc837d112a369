"""Typed API of ragtune: the single source of truth for CRDs, the operator and the workloads' config."""
