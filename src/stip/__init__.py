"""stip: secure transformer inference.

P1 (the model provider) seals a Hugging Face model with a secret key (`stip.keys`,
`stip.seal`); P2 (the cloud) serves the sealed checkpoint (`stip.serve`); P3 (the user)
embeds locally and permutes (`stip.client`).
"""

__version__ = "0.1.0"
