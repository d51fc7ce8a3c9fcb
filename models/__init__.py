"""keywatch models package."""
