"""The server optimizer step of the mean rules, one window at a time.

FedAvgM (Hsu et al. 2019) and FedAdam, FedYogi, FedAdagrad (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 2), with the aggregated delta as the negative
gradient; moments start at ``m = 0``, ``v = tau^2``; no bias correction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._sources import scratch


def server_step(
    optimizer: str,
    params: Mapping[str, Any],
    delta: torch.Tensor,
    global_window: torch.Tensor,
    out: torch.Tensor,
    previous: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
) -> None:
    """``out`` = the global window after one step on ``delta``; the new moments go into
    ``new["m"]`` (and ``new["v"]``). ``previous``: the stored moments there are."""
    result = out if out.dtype == delta.dtype else scratch("res", delta.numel(), delta.dtype)
    if optimizer == "fedavgm":
        direction = _momentum(params, delta, previous.get("m"), new["m"])
    else:
        direction = _adaptive_direction(optimizer, params, delta, previous, new)
    torch.add(global_window, direction, alpha=float(params["server_lr"]), out=result)
    if result is not out:
        out.copy_(result)


def _momentum(
    params: Mapping[str, Any], delta: torch.Tensor, m_old: torch.Tensor | None, m: torch.Tensor
) -> torch.Tensor:
    """FedAvgM: ``m = momentum m + delta`` (``delta`` the first time)."""
    if m_old is None:
        m.copy_(delta)
    else:
        torch.mul(m_old, float(params["momentum"]), out=m)
        m.add_(delta)
    return m


def _adaptive_direction(
    optimizer: str,
    params: Mapping[str, Any],
    delta: torch.Tensor,
    previous: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """``m / (sqrt(v) + tau)`` after updating ``m = b1 m + (1 - b1) delta`` and ``v``."""
    c, dtype = delta.numel(), delta.dtype
    beta1 = float(params["beta1"])
    tau = float(params["tau"])
    m, m_old, v_old = new["m"], previous.get("m"), previous.get("v")
    if m_old is None:
        torch.mul(delta, 1.0 - beta1, out=m)
    else:
        torch.mul(m_old, beta1, out=m)
        m.add_(delta, alpha=1.0 - beta1)
    squared = scratch("d2", c, dtype)
    torch.mul(delta, delta, out=squared)
    v_prev = scratch("v0", c, dtype).fill_(tau * tau) if v_old is None else v_old
    _second_moment(optimizer, params, v_prev, squared, new["v"])
    step = scratch("step", c, dtype)
    torch.sqrt(new["v"], out=step)
    step.add_(tau)
    torch.div(m, step, out=step)
    return step


def _second_moment(
    optimizer: str, params: Mapping[str, Any], v_prev: torch.Tensor, squared: torch.Tensor, v: torch.Tensor
) -> None:
    """Adam: ``b2 v + (1 - b2) d^2``; Yogi: ``v - (1 - b2) d^2 sign(v - d^2)``; Adagrad: ``v + d^2``."""
    if optimizer == "fedadam":
        beta2 = float(params["beta2"])
        torch.mul(v_prev, beta2, out=v)
        v.add_(squared, alpha=1.0 - beta2)
    elif optimizer == "fedyogi":
        beta2 = float(params["beta2"])
        sign = scratch("sign", squared.numel(), squared.dtype)
        torch.sub(v_prev, squared, out=sign)
        sign.sign_().mul_(squared)
        torch.sub(v_prev, sign, alpha=1.0 - beta2, out=v)
    else:  # fedadagrad
        torch.add(v_prev, squared, out=v)
