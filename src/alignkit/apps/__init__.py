"""Applications built on alignkit models: agents and the tools they use."""
