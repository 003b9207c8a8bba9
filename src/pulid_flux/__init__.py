"""pulid-flux: a self-hosted twin of fal's ``fal-ai/flux-pulid`` endpoint (FLUX.1-dev + PuLID)."""

__version__ = "0.1.0"
