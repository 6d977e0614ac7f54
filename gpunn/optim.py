"""Gradient-descent update rules, written once like the rest of the math: pure functions on lists of arrays.

With the exponentially weighted averages of the seed notes, for every parameter P with gradient dP at step t = 1, 2, ...::

    gd        P <- P - lr dP
    momentum  v <- b1 v + (1 - b1) dP                  P <- P - lr v
    rmsprop   s <- b2 s + (1 - b2) dP**2               P <- P - lr dP / (sqrt(s) + eps)
    adam      v, s as above;  v^ = v / (1 - b1**t),  s^ = s / (1 - b2**t)   P <- P - lr v^ / (sqrt(s^) + eps)

The state (v, s) lives on the parameters' device, starts at zero, and is saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from gpunn.errors import ConfigError
from gpunn.nn import Layer

OPTIMIZERS = ("gd", "momentum", "rmsprop", "adam")
SCHEDULES = ("constant", "step", "cosine")
# which running averages each rule keeps
_STATE = {"gd": (), "momentum": ("v",), "rmsprop": ("s",), "adam": ("v", "s")}


@dataclass(frozen=True)
class Optimizer:
    name: str = "gd"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")

    @property
    def state_names(self) -> tuple[str, ...]:
        return _STATE[self.name]

    def init(self, params: list[Layer]) -> dict[str, list[Layer]]:
        """Zero running averages shaped like the parameters, on their device."""
        xp = array_namespace(params[0].W)
        return {name: [Layer(xp.zeros_like(W), xp.zeros_like(b)) for W, b in params] for name in self.state_names}

    def step(self, params: list[Layer], grads: list[Layer], state: dict[str, list[Layer]], lr: float, t: int
             ) -> tuple[list[Layer], dict[str, list[Layer]]]:
        """The update for step t (1-based): new parameters and new state; nothing is modified in place."""
        new_params: list[Layer] = []
        new_state: dict[str, list[Layer]] = {name: [] for name in state}
        for l, (layer, grad) in enumerate(zip(params, grads)):
            updated, averages = [], {name: [] for name in state}
            for i, (P, dP) in enumerate(zip(layer, grad)):
                P, kept = self._update(P, dP, {name: state[name][l][i] for name in state}, lr, t)
                updated.append(P)
                for name, value in kept.items():
                    averages[name].append(value)
            new_params.append(Layer(*updated))
            for name in state:
                new_state[name].append(Layer(*averages[name]))
        return new_params, new_state

    def _update(self, P: Any, dP: Any, state: dict[str, Any], lr: float, t: int) -> tuple[Any, dict[str, Any]]:
        xp = array_namespace(P, dP)
        b1, b2 = self.beta1, self.beta2
        if self.name == "gd":
            return P - lr * dP, {}
        if self.name == "momentum":
            v = b1 * state["v"] + (1 - b1) * dP
            return P - lr * v, {"v": v}
        s = b2 * state["s"] + (1 - b2) * dP * dP
        if self.name == "rmsprop":
            return P - lr * dP / (xp.sqrt(s) + self.eps), {"s": s}
        v = b1 * state["v"] + (1 - b1) * dP
        v_hat, s_hat = v / (1 - b1**t), s / (1 - b2**t)
        return P - lr * v_hat / (xp.sqrt(s_hat) + self.eps), {"v": v, "s": s}


def learning_rate(schedule: str, lr: float, epoch: int, epochs: int, *, step_size: int = 100, gamma: float = 0.1
                  ) -> float:
    """The learning rate for ``epoch`` (1-based) of ``epochs``.

    constant: lr.  step: lr * gamma ** floor((epoch - 1) / step_size).
    cosine: lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2, from lr at the first epoch down towards 0 at the last.
    """
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** ((epoch - 1) // step_size)
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2
    raise ConfigError(f"unknown learning-rate schedule {schedule!r}; expected one of {SCHEDULES}")
