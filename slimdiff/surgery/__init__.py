"""Stage 5: the closed-form rewrites of a denoiser's layers, and LoRAs projected onto them."""
