"""The two-party MPC baseline on SecretFlow SPU: one JAX transformer forward (`model`),
config and weights from `transformers` (`stip.models.blocks`), simulation (`runner`), real parties (`parties`),
network emulation (`netem`)."""
