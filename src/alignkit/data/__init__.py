"""Data: formats, validation and tokenisation for each recipe, plus small shipped example sets."""
