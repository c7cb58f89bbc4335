"""What the tests, the benchmarks and the scripts share, outside the product: starting and stopping real processes.

Neither tests/ nor bench/ owns it, so neither has to import the other.
"""
