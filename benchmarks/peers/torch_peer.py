"""The paper's MNIST model and protocol in PyTorch: an eager loop and a `torch.compile` one.

Model and protocol as in `jax_peer.py` (784-500-J tanh, Bernoulli, estimator B, L = 1,
dynamic binarization, Adagrad from a zero accumulator with epsilon 1e-8 outside the square
root, weight decay 1/N, N(0, 0.01^2) initialization).

What each does (as a PyTorch engineer would write it for speed):
- Both keep the training images in memory as one tensor and gather each minibatch by index
  from a per-epoch permutation (no DataLoader, no worker processes, no per-batch copies).
- `EagerTrainer`: `nn.Module`, `loss.backward()`, `torch.optim.Adagrad(foreach=True)` (its
  multi-tensor update; `initial_accumulator_value=0`, `eps=1e-8` after the square root, the
  paper's weight decay through the optimizer's `weight_decay`), `set_to_none` gradients,
  `torch.backends` defaults (oneDNN / MKL matmuls).
- `CompiledTrainer`: the whole step (gather, binarization, eps, forward, backward through
  `torch.func.grad_and_value`, Adagrad update in place) is one function under
  `torch.compile(mode="max-autotune-no-cudagraphs")`, so Inductor fuses the element-wise work
  of the step and the update into a few C++ kernels around the matmuls: one graph per step,
  no graph breaks (checked with `fullgraph=True`).
"""

import numpy as np
import torch
from torch import nn

EAGER_NAME = "PyTorch eager"
COMPILED_NAME = "torch.compile (one graph per step)"


class Model(nn.Module):
    def __init__(self, data_dim=784, hidden=500, latent_dim=20):
        super().__init__()
        self.enc = nn.Linear(data_dim, hidden)
        self.mu = nn.Linear(hidden, latent_dim)
        self.log_var = nn.Linear(hidden, latent_dim)
        self.dec = nn.Linear(latent_dim, hidden)
        self.out = nn.Linear(hidden, data_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 0.01)  # the paper's N(0, 0.01^2), biases included

    def forward(self, x, eps):
        """Per-example SGVB estimator B."""
        h = torch.tanh(self.enc(x))
        mu, log_var = self.mu(h), self.log_var(h)
        z = mu + torch.exp(0.5 * log_var) * eps
        logits = self.out(torch.tanh(self.dec(z)))
        log_px = (x * logits - nn.functional.softplus(logits)).sum(-1)
        kl = -0.5 * (1.0 + log_var - mu.square() - log_var.exp()).sum(-1)
        return log_px - kl


class _Base:
    def __init__(self, images, latent_dim=20, hidden=500, batch_size=100, learning_rate=0.02,
                 weight_decay=None, seed=0):  # fmt: skip
        torch.manual_seed(seed)
        images = np.asarray(images, np.float32).reshape(len(images), -1)
        self.images = torch.from_numpy(images.copy())
        self.num_examples = len(images)
        self.batch_size, self.latent_dim = batch_size, latent_dim
        self.steps_per_epoch = self.num_examples // batch_size
        self.learning_rate = learning_rate
        self.weight_decay = 1.0 / self.num_examples if weight_decay is None else weight_decay
        self.model = Model(images.shape[1], hidden, latent_dim)

    def bound(self, x_binary, seed=1):
        x = torch.from_numpy(np.asarray(x_binary, np.float32).reshape(len(x_binary), -1))
        generator = torch.Generator().manual_seed(seed)
        eps = torch.randn(len(x), self.latent_dim, generator=generator)
        with torch.no_grad():
            return float(self.model(x, eps).mean())

    def train_epoch(self):
        order = torch.randperm(self.num_examples)
        loss = None
        for i in range(self.steps_per_epoch):
            loss = self.step(order[i * self.batch_size : (i + 1) * self.batch_size])
        return float(loss)


class EagerTrainer(_Base):
    name = EAGER_NAME

    def __init__(self, images, **kwargs):
        super().__init__(images, **kwargs)
        self.optimizer = torch.optim.Adagrad(
            self.model.parameters(),
            lr=self.learning_rate,
            initial_accumulator_value=0.0,
            eps=1e-8,
            weight_decay=self.weight_decay,
            foreach=True,
        )

    def step(self, index):
        grey = self.images[index]
        x = (torch.rand_like(grey) < grey).float()
        eps = torch.randn(len(index), self.latent_dim)
        loss = -self.model(x, eps).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class CompiledTrainer(_Base):
    name = COMPILED_NAME

    def __init__(self, images, **kwargs):
        super().__init__(images, **kwargs)
        self.params = {k: v.detach() for k, v in self.model.named_parameters()}
        self.accumulators = {k: torch.zeros_like(v) for k, v in self.params.items()}
        model, images_, lr, wd = self.model, self.images, self.learning_rate, self.weight_decay
        latent_dim = self.latent_dim

        def loss_fn(params, x, eps):
            return -torch.func.functional_call(model, params, (x, eps)).mean()

        grad_and_value = torch.func.grad_and_value(loss_fn)

        def step(params, accumulators, index):
            grey = images_[index]
            x = (torch.rand_like(grey) < grey).float()
            eps = torch.randn(index.shape[0], latent_dim)
            grads, loss = grad_and_value(params, x, eps)
            with torch.no_grad():
                for name, p in params.items():
                    g = grads[name] + wd * p
                    a = accumulators[name]
                    a.add_(g * g)
                    p.sub_(lr * g / (a.sqrt() + 1e-8))
            return loss

        self._step = torch.compile(step, fullgraph=True, mode="max-autotune-no-cudagraphs")

    def step(self, index):
        return self._step(self.params, self.accumulators, index)
