"""thinkforge: turn a small language model into a step-by-step reasoner, and prove it with numbers.

`import thinkforge` stays light: torch, transformers and math-verify are imported where they are used.
"""

from thinkforge.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
