"""jaxsafe: methods for safer and more robust generative and representation models, in JAX."""

__version__ = "0.1.0"
