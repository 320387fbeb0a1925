"""The latents layer: frozen encoders, VAE and text encoders, and the hierarchy of pooled, SVD-reduced, standardised features they make."""
