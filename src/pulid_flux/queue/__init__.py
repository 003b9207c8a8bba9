"""Request queues: an interface and its backends."""
