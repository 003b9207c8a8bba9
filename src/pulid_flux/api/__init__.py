"""fal's HTTP protocol for ``fal-ai/flux-pulid``: wire schemas and routes."""
