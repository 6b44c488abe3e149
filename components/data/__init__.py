"""Manifests, dataset adapters, the procedural default data, supervision regimes and image I/O."""
