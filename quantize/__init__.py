"""ossedge.quantize."""
