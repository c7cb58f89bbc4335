"""What operators look at: the order view, the Prometheus exposition, Flower, replay, reconciliation."""
