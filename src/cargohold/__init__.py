"""cargohold: a pull-through cache and mirror for Docker Hub and other OCI registries."""

__version__ = "0.1.0"
