"""Stage 6: quality of a compressed pipeline against its original (metrics, reports)."""
