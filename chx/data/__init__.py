"""Manifests, dataset adapters, image decoding, transforms and samplers."""
