"""The denoiser process: UNet, scheduler and a VAE, never a text encoder."""
