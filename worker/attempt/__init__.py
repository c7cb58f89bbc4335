"""The story of one delivery: its state machine, the retry decision, the attempt record and line."""
