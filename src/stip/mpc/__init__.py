"""The two-party MPC baseline on SecretFlow SPU: one JAX transformer forward (`model`),
weights from `transformers` (`weights`), simulation (`runner`), real parties (`parties`),
network emulation (`netem`)."""
