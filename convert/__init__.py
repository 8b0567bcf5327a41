"""ossedge.convert."""
