"""thinkforge: turn a small language model into a step-by-step reasoner, and prove it with numbers.

`import thinkforge` stays light: torch, transformers and math-verify are imported where they are used.
"""

import importlib.abc
import logging
import sys

from thinkforge.errors import UserError


class _NoHubKernelsForBitsandbytes(importlib.abc.MetaPathFinder):
    """bitsandbytes' CPU backend (imported with bitsandbytes, which peft imports whenever it is installed) asks the
    optional `kernels` package, at import, for a kernel from the Hub on a CPU with AVX-512 BF16
    ("kernels-community/quantization-bitsandbytes"). thinkforge runs no downloaded code unasked (as
    trust_remote_code): while that one module runs, `kernels` cannot be imported (even where transformers has
    imported it already), so bitsandbytes takes its own compiled CPU kernels. Nothing else is changed."""

    MODULE = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path=None, target=None):
        if name != self.MODULE:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutKernels(spec.loader)
        return spec


class _WithoutKernels(importlib.abc.Loader):
    """Runs a module with `kernels` unimportable (`from kernels import ...` raises ImportError), then restores it."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        had = sys.modules.get("kernels", self)
        sys.modules["kernels"] = None
        try:
            self.loader.exec_module(module)
        finally:
            if had is self:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = had


if not any(isinstance(f, _NoHubKernelsForBitsandbytes) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoHubKernelsForBitsandbytes())
# ... and the warning bitsandbytes then logs ("Failed to load CPU gemm_4bit_forward from kernels-community") is
# dropped: there is nothing for a user to do.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

__all__ = ["UserError"]
__version__ = "0.1.0"
