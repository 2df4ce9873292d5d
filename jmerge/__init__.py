"""jmerge: safety-aware merging of LLMs in JAX.

One params pytree is the currency between I/O, merge, search and eval: nested dicts keyed by the
Hugging Face module path, HF tensor layouts kept, decoder layers stacked on a leading axis.
"""

__version__ = "0.1.0"
