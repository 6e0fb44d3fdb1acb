"""Flow matching: timestep sampling, the training objective and the samplers."""
