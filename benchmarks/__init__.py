"""ossedge.benchmarks."""
