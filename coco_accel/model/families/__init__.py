"""Encoder families the Condenser runs on: one module each, behind `base.Family`."""
