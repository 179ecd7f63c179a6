"""Named experiment configs; ``get_config(name)`` is the one entry point (see registry.py)."""

from experiments.registry import DEFAULT
from experiments.registry import describe
from experiments.registry import get_config
from experiments.registry import names
from experiments.registry import where

__all__ = ['DEFAULT', 'describe', 'get_config', 'names', 'where']
