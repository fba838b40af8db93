"""Stages 3-4: influence, error profiles, costs (parameters, FLOPs, latency) and the rank allocation."""
