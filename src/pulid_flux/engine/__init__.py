"""The generation engine: FLUX.1-dev (diffusers) + the PuLID ID encoder and cross-attention."""
