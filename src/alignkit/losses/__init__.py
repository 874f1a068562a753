"""Losses and estimators: small pure functions of tensors, each citing its equation."""
