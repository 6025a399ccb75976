"""ssl_lab: config-driven self-supervised learning (SimCLR, NNCLR)."""

from ssl_lab.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError"]
