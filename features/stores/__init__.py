"""State stores: one interface, an in-memory and a Redis backend."""
