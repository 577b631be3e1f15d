"""Scale-out on Ray Data: the encoder and the denoiser as actor pools (`run --engine ray`)."""
