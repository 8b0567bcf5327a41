"""ossedge: gpt-oss-20b for 16 GB phones, tablets and laptops."""

__version__ = "0.1.0"
