"""File storage for uploads and generated images: an interface and its backends."""
