"""P3, the user: embed locally, permute, send, un-permute."""

from .bundle import ClientBundle, InvalidBundle, permute, unpermute

__all__ = ["ClientBundle", "InvalidBundle", "permute", "unpermute"]
