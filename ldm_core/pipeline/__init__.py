"""The denoising loop shared by every mode, and the pixel/latent helpers around it."""
