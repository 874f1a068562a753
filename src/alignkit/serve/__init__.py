"""Serving: an OpenAI-compatible HTTP server with dynamic batching on the rollout engine."""
