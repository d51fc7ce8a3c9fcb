"""keywatch serving package."""
