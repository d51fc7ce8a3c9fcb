"""keywatch features package."""
