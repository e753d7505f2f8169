"""The defaults of every field (pmg_jax/config.py documents each), e.g. for an ImageFolder dataset."""

from pmg_jax.config import get_config  # noqa: F401
