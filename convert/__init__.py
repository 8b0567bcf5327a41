"""ossedge.convert: the conversion pipeline every target goes through, and verify."""
