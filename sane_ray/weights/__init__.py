"""Weight preprocessing: tokenization, per-layer standardization, alignment and augmentation."""
