"""Published pretrained weights for registered names. (Placeholder table: filled in by the weights work.)"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightSource:
    tag: str


def sources_for(name: str) -> list[WeightSource]:
    return []
