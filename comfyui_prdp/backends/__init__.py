from .base import Backend, Cond

__all__ = ["Backend", "Cond"]
