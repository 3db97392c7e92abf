"""thinkforge: turn a small language model into a step-by-step reasoner, and prove it with numbers.

`import thinkforge` stays light: torch, transformers and math-verify are imported where they are used.
"""

import logging

from thinkforge.errors import UserError

# bitsandbytes, which peft imports wherever it is installed, asks the optional `kernels` package for a Hub kernel on
# a CPU with AVX-512 BF16 and logs a warning when that package is absent; its own compiled CPU kernels then run,
# and there is nothing for a user to do (models.import_bitsandbytes: thinkforge fetches no code from the Hub).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

__all__ = ["UserError"]
__version__ = "0.1.0"
