"""Rate limiting per identity: budgets from presets and overrides, counted with the `limits` library."""
