"""Named experiment configs; ``get_config(name)`` is the one entry point (see registry.py)."""

from experiments.registry import DEFAULT, describe, get_config, names, where

__all__ = ['DEFAULT', 'describe', 'get_config', 'names', 'where']
