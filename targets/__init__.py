"""ossedge.targets."""
