"""keywatch training package."""
