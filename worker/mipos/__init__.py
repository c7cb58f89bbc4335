"""All HTTP to mipos: the client, the classification of answers, the token store, the pending list."""
