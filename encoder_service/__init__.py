"""The encoder process: tokenizers and the two CLIP text encoders, never the UNet or VAE."""
