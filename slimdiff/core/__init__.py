"""Numerics and data types every stage shares: linear algebra, the activation statistics, the memory model."""
