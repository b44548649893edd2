"""P2, the cloud: serve a sealed checkpoint. Holds no permutation and imports no key code."""
