"""The OCI vocabulary: digests, media types, names and what a manifest refers to."""
