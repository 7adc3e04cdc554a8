"""The pull-through rules by service: manifests by digest, tags, and links; each wraps the local index and
store and a typed remote (`cargohold.upstream.repository`)."""
