"""The sandbox mipos server (``python -m sandbox``) and a client for its controls."""

from sandbox.control import SandboxControl

# The account the sandbox accepts; `make run` and the tests use it.
SANDBOX_CREDENTIALS = {
    "client_id": "sandbox-client",
    "client_secret": "sandbox-client-secret-5e1f",
    "email": "pos@sandbox.invalid",
    "password": "sandbox-password-9a7c",
}

__all__ = ["SANDBOX_CREDENTIALS", "SandboxControl"]
