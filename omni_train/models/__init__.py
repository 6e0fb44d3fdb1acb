"""Networks: the causal 3D VAE, condition encoders, pose guider and MMDiT denoiser."""
