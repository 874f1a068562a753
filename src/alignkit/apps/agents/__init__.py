"""Agents that act through tools, and the sandbox their generated code runs in."""
