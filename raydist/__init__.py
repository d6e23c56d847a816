"""raydist: Ray-based adversarial training."""
__version__ = "0.1.0"
