"""Everything the workers share in Redis; each module owns its keys (no key string outside it)."""
