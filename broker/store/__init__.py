"""store stage of the broker."""
