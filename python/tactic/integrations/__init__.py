"""Integrations with model frameworks (optional extras): `tactic.integrations.transformers`."""
