"""cli stage of the broker."""
