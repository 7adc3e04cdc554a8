"""HTTPS for the listener: certificates from files (reloaded on change) or from an ACME CA."""
