"""Compressed folders: saving, loading (diffusers' from_pretrained), pipelines and model cards."""
