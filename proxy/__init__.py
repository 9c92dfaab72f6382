"""entropy-proxy: the HTTP service."""
