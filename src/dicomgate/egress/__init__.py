"""egress package."""
