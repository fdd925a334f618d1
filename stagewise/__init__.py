"""stagewise: the whole development of a language model, runnable and measurable stage by stage."""

__version__ = "0.1.0"
