"""SGD and Adam with torch.optim's update rules, applied in place to ``Parameter.data``.

Parameters whose ``.grad`` is None (no backward reached them) are skipped, as in torch.
"""

import math

import numpy as np

from npanomaly._validation import check_nonnegative_float

__all__ = ["Adam", "Optimizer", "SGD"]


class Optimizer:
    """Holds the parameter list and per-parameter state; subclasses implement ``_update``."""

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = check_nonnegative_float(lr, "lr")
        self.state = [{} for _ in self.params]

    def zero_grad(self, set_to_none=True):
        """Clear every parameter's gradient (None, as torch >= 2.0 does, or zeros)."""
        for param in self.params:
            param.grad = None if set_to_none or param.grad is None else np.zeros_like(param.grad)

    def step(self):
        """Apply one update to every parameter that has a gradient."""
        for param, state in zip(self.params, self.state):
            if param.grad is not None:
                self._update(param, param.grad, state)

    def state_dict(self):
        """Flat name -> array mapping of the optimizer's per-parameter state (for saving)."""
        flat = {}
        for index, state in enumerate(self.state):
            for key, value in state.items():
                flat[f"{index}.{key}"] = np.asarray(value)
        return flat

    #: the per-parameter state entries a subclass keeps: all of them or none, for each parameter
    _state_keys = ()

    def load_state_dict(self, flat):
        """Restore what state_dict() returned, checked entry by entry (a saved file is input like any
        other): known names only, each array the shape and dtype of its parameter and finite, second
        moments >= 0, step counts whole numbers >= 1. Nothing changes when a check fails."""
        state = [{} for _ in self.params]
        for name, value in flat.items():
            index, _, key = str(name).partition(".")
            if not index.isdigit() or int(index) >= len(self.params) or key not in self._state_keys:
                raise ValueError(f"optimizer state has an unknown entry {name!r} for {type(self).__name__} with "
                                 f"{len(self.params)} parameters")
            param = self.params[int(index)].data
            value = np.asarray(value)
            if key == "step":
                if value.shape != () or value.dtype.kind not in "iu" or value < 1:
                    raise ValueError(f"optimizer state {name!r} must be a whole number >= 1, got {value!r}")
                state[int(index)][key] = int(value)
                continue
            if value.shape != param.shape or value.dtype != param.dtype:
                raise ValueError(f"optimizer state {name!r} has shape {value.shape} ({value.dtype}), expected "
                                 f"{param.shape} ({param.dtype}) like its parameter")
            if not np.isfinite(value).all() or (key == "exp_avg_sq" and value.min() < 0):
                raise ValueError(f"optimizer state {name!r} holds NaN, infinite or (second moments) negative values")
            state[int(index)][key] = np.array(value, copy=True)
        for index, entries in enumerate(state):
            if entries and set(entries) != set(self._state_keys):
                raise ValueError(f"optimizer state of parameter {index} has {sorted(entries)}, expected all of "
                                 f"{list(self._state_keys)}")
        self.state = state


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay (torch.optim.SGD).

    g = grad + weight_decay * p;  buf = g on the first step, else momentum * buf + (1 - dampening) * g;
    with nesterov the step direction is g + momentum * buf, otherwise buf;  p -= lr * direction.
    """

    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
        super().__init__(params, lr)
        self.momentum = check_nonnegative_float(momentum, "momentum")
        self.weight_decay = check_nonnegative_float(weight_decay, "weight_decay")
        self.dampening = check_nonnegative_float(dampening, "dampening")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0.0 or self.dampening != 0.0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")

    def _update(self, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param.data
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= self.momentum
                buf += (1.0 - self.dampening) * grad
            grad = grad + self.momentum * buf if self.nesterov else buf
        param.data -= self.lr * grad


class Adam(Optimizer):
    """Adam (Kingma and Ba 2015) with torch.optim.Adam's arithmetic; weight_decay is L2 (not AdamW).

    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  t += 1;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """

    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        self.betas = tuple(check_nonnegative_float(b, "betas") for b in betas)
        if not all(b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        self.eps = check_nonnegative_float(eps, "eps")
        self.weight_decay = check_nonnegative_float(weight_decay, "weight_decay")

    def _update(self, param, grad, state):
        beta1, beta2 = self.betas
        if self.weight_decay:
            grad = grad + self.weight_decay * param.data
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(param.data)
            state["exp_avg_sq"] = np.zeros_like(param.data)
        state["step"] += 1
        exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        exp_avg += (1.0 - beta1) * (grad - exp_avg)
        exp_avg_sq *= beta2
        exp_avg_sq += (1.0 - beta2) * grad * grad
        step_size = self.lr / (1.0 - beta1**step)
        denom = np.sqrt(exp_avg_sq) / math.sqrt(1.0 - beta2**step) + self.eps
        param.data -= step_size * exp_avg / denom
