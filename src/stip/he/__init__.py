"""The HE baseline: CKKS (TenSEAL) inference of the polynomial ViT. See ckks.py and runner.py."""
