"""dimse package."""
