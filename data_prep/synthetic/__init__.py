"""Seeded generators of synthetic cohorts in real on-disk layouts (no downloads needed)."""
