"""TSPO: Turn-level Stage-aware Policy Optimization for LLM search agents."""

__version__ = "0.1.0"
