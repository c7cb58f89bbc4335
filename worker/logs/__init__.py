"""Logging: the setup of structlog and the stdlib, and the redaction of secrets."""
