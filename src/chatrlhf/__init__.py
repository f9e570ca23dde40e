"""chatrlhf: align chat LLMs with human feedback."""
__version__ = "0.1.0"
