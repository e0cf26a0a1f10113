"""api stage of the broker."""
