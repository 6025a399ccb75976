"""ssl_lab: config-driven self-supervised learning (SimCLR, NNCLR)."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""
