"""Shared test helpers (tiny configs and datasets, the transformers reference, small
tokenizers and models). Test modules import from here, never from each other."""
