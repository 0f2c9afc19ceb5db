"""The commands: python -m classify, export and quantize (thin modules at the top run these)."""
