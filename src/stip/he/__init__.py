"""The HE baseline: CKKS on SEAL (through tenseal.sealapi), packed with rotations, for the polynomial ViT and LM. See ckks.py, packing.py and runner.py."""
