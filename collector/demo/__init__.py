"""The throwaway demo fleet and the sandbox of clusters that tests and benchmarks use.

Not used by a running fleet.
"""
