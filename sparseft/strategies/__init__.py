"""Sparsity strategies: Lightning callbacks that drive the machinery in :mod:`sparseft.sparse`."""

from sparseft.strategies.base import SparsityStrategy
from sparseft.strategies.dsee import DSEE
from sparseft.strategies.lora import LoRA
from sparseft.strategies.magnitude import Magnitude
from sparseft.strategies.movement import Movement
from sparseft.strategies.pst import PST
from sparseft.strategies.registry import available_strategies, build_strategy, get_strategy, register_strategy
from sparseft.strategies.s2ft import S2FT
from sparseft.strategies.spdf import SPDF

__all__ = [
    "DSEE", "PST", "LoRA", "S2FT", "SPDF", "Magnitude", "Movement", "SparsityStrategy", "available_strategies",
    "build_strategy", "get_strategy", "register_strategy",
]
