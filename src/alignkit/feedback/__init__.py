"""Rankings of sampled completions: by people in a labeling web app (label_app), or by AI judges (ai_label)."""
