"""What an order is: its model, its checked arguments, the stamps its message carries."""
