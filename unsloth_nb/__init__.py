"""unsloth_nb: from a fine-tune to a served model inside a notebook.

train -> merge -> GGUF -> serve, each step planned against the machine's RAM and disk first.
"""

from unsloth_nb.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
