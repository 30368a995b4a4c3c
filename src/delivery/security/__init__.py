"""Security scanning: one findings model for every tool, one policy, one summary."""
