"""Building and locating SDXL models: the tiny test model, the full-size random one, and real ones."""
