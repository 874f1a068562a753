"""Recipes: one file per training method, read top to bottom (setup -> train -> evaluate -> save)."""
