"""The inference pipeline: uploaded bytes to outcomes, and the runtimes that run the forward pass. No transport here."""
