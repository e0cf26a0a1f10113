"""mint stage of the broker."""
