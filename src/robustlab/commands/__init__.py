"""Commands of the CLI that live beside their subject: each module has ``register(sub)``."""
