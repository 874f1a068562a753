"""Evaluation: judges that score completions, and their composition into one score."""
