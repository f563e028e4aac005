"""Training: the resumable loop, language-model loss and data."""
