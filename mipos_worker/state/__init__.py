"""What the POS side keeps in Redis: the in-flight registration, and the clients it is written with."""
