"""What the POS imports: ``from tasks import accept_order, deny_order``."""

from tasks.orders import accept_order, deny_order

__all__ = ["accept_order", "deny_order"]
