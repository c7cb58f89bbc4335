"""``mipos-worker``: the operator's command line (orders, dead letters, doctor, sandbox)."""
