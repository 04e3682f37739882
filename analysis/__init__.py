"""Scaling-law fits, ablation tables and plots over training results; trains nothing."""
