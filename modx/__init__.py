"""modx: continual vision-language training."""
__version__ = "0.1.0"
