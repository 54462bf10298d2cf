"""Fields: density grids, SDF-derived density and the latent-conditioned implicit decoder (all offer ``query``)."""
