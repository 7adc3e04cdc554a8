"""Sync lists: images prefetched on a schedule, revalidated with HEADs, and pinned."""
