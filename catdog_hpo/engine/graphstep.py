"""The training step through static buffers, optionally captured in a CUDA graph.

For the small CNNs a search runs, an eager step is launch-bound (~150 kernel launches, ~0.1 ms
of math against 1-2 ms of host time on an H200). Captured once, a step is one graph replay.

What capture needs, and how this module provides it:
- static inputs: every step copies its batch into ``static_x``/``static_y`` (same addresses);
- an lr the graph reads from memory: the optimizer gets ``lr`` as a 0-d device tensor, and the
  schedule runs on a shadow optimizer whose Python float lr is written into it (``set_lr``);
- an optimizer step without host syncs: fused Adam/AdamW with ``capturable=True``; torch's SGD
  has no capturable mode, so SGD is ``ForeachSGD`` below (foreach ops, device lr);
- warm-up: the first ``WARMUP_STEPS`` steps run eagerly on a side stream, one per StaticStep
  (they are real training steps: optimizer state is created there), then the step is captured
  and replayed;
- autocast with ``cache_enabled=False`` (the weight-cast cache must not outlive a capture).

Without ``capture`` (the CPU, or a failed capture) the same static step runs eagerly: the tests
run this path on the CPU.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch
from torch import nn

from catdog_hpo.config import OptimConfig

WARMUP_STEPS = 3  # eager steps before capture (optimizer state, cuDNN/cuBLAS handles, allocator)
GRAPH_OPTIMIZERS = ("sgd", "adam", "adamw")  # RMSprop keeps the eager loop


class ForeachSGD:
    """SGD (momentum, nesterov, weight decay; dampening 0) with the lr a 0-d device tensor.

    The same update as torch.optim.SGD: d = g + wd*p; buf = m*buf + d (buf starts at d);
    d = d + m*buf (nesterov) or buf; p -= lr*d. Buffers start at zero, so the first
    m*0 + d equals torch's clone of d. No host syncs, so it can be graph-captured."""

    def __init__(self, params: list[nn.Parameter], o: OptimConfig, lr: torch.Tensor) -> None:
        self.params = params
        self.momentum, self.nesterov, self.weight_decay = o.momentum, o.nesterov, o.weight_decay
        self.lr = lr
        self.bufs = [torch.zeros_like(p) for p in params] if o.momentum > 0 else []
        self.param_groups = [{"lr": lr}]

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum > 0:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, grads)
            grads = torch._foreach_add(grads, self.bufs, alpha=self.momentum) if self.nesterov else self.bufs
        torch._foreach_add_(self.params, torch._foreach_mul(grads, self.lr), alpha=-1.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """The momentum buffers (what engine.resume saves; the lr lives in the schedule)."""
        return {"bufs": self.bufs}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        with torch.no_grad():
            for buf, saved in zip(self.bufs, state["bufs"], strict=True):
                buf.copy_(saved)


def graph_optimizer(params: list[nn.Parameter], o: OptimConfig, device: torch.device,
                    fused: bool) -> tuple[torch.optim.Optimizer | ForeachSGD, torch.Tensor]:
    """(optimizer, its lr tensor) for the static step; the lr tensor lives on ``device``.
    On CUDA always capturable, captured or not: the step count stays on the device, and the
    single-tensor Adam would read a tensor lr back to the host per parameter per step."""
    assert o.name in GRAPH_OPTIMIZERS, o.name
    lr = torch.tensor(o.lr, dtype=torch.float32, device=device)
    if o.name == "sgd":
        return ForeachSGD(params, o, lr), lr
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    capturable = device.type == "cuda"  # torch's capturable mode runs on CUDA, not the CPU
    # a tensor lr needs fused, capturable or the single-tensor loop (the CPU's plain fallback)
    foreach = None if fused else capturable
    opt = cls(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None, foreach=foreach,
              capturable=capturable)
    for group in opt.param_groups:  # the tensor after __init__: its `0 <= lr` check would read it back
        group["lr"] = lr
    return opt, lr


class StaticStep:
    """One optimizer step per call on static buffers; captured in a CUDA graph when ``capture``."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], criterion: nn.Module,
                 optimizer: torch.optim.Optimizer | ForeachSGD, params: list[nn.Parameter],
                 grad_clip: float, autocast: torch.dtype | None, x_like: torch.Tensor,
                 y_like: torch.Tensor, capture: bool) -> None:
        self.forward, self.criterion, self.optimizer = forward, criterion, optimizer
        self.params, self.grad_clip, self.autocast = params, grad_clip, autocast
        self.static_x = torch.empty_like(x_like)  # keeps x_like's memory format (channels_last)
        self.static_y = torch.empty_like(y_like)
        self.loss_sum = torch.zeros((), device=x_like.device)  # summed by the step itself
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        # the warm-up's side stream, made once: each torch.cuda.Stream() hands out the pool's next
        # stream, so a stream per step ran every warm-up step on another one
        self.side = torch.cuda.Stream(device=x_like.device) if capture else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.static_x.device.type, dtype=self.autocast, cache_enabled=False)

    def _body(self) -> None:
        with self._autocast():
            loss = self.criterion(self.forward(self.static_x), self.static_y)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # foreach, no host sync
        self.optimizer.step()
        self.loss_sum.add_(loss.detach())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x.copy_(x)  # x may be a slice of the augmented chunk: same shape, same layout
        self.static_y.copy_(y)
        self.steps += 1
        if self.graph is not None:
            self.graph.replay()
            return
        if self.capture and self.steps > WARMUP_STEPS:
            self.graph = self._try_capture()
            if self.graph is not None:
                self.graph.replay()  # capture records, it does not run: run this step now
                return
        self.optimizer.zero_grad(set_to_none=True)
        if self.capture:  # warm-up on a side stream, as capture will run (CUDA graph docs)
            dev = self.static_x.device
            self.side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(self.side):
                self._body()
            torch.cuda.current_stream(dev).wait_stream(self.side)
        else:
            self._body()

    def _try_capture(self) -> torch.cuda.CUDAGraph | None:
        """The captured step, or None (and eager from now on) when capture fails."""
        # grads None at capture: backward allocates them in the graph's pool and every replay
        # writes (not accumulates) them there, so replays need no zero_grad
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.static_x.device), torch.cuda.graph(graph):
                self._body()
        except Exception as exc:  # an op that cannot be captured: keep training without a graph
            stop = _stop_request(exc)
            if stop is not None:  # a signal mid-capture, then capture_end failed on top of it
                raise stop from None
            print(f"warning: CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  "training this trial without it", file=sys.stderr)
            self.capture = False
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.static_x.device)
            return None
        return graph

    def take_loss_sum(self) -> torch.Tensor:
        """The loss summed since the last call (a device scalar); the static sum restarts at 0."""
        out = self.loss_sum.clone()
        self.loss_sum.zero_()
        return out


def _stop_request(exc: BaseException) -> BaseException | None:
    """A KeyboardInterrupt or SIGTERM (any BaseException that is not an Exception) that ``exc``
    was raised while handling: torch.cuda.graph's exit ends the capture even when the body
    raised, and an error there would otherwise hide the stop request under a capture failure."""
    seen: set[int] = set()
    e: BaseException | None = exc.__context__
    while e is not None and id(e) not in seen:
        if not isinstance(e, Exception):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
