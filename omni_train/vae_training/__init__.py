"""Training this project's causal 3D VAE: losses, held-out metrics, export, the trainer."""
