"""ossedge.cli: the `ossedge` command line, on top of everything else (nothing imports it)."""
