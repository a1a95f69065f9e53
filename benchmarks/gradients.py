"""Gradient sources for the quality benchmark: synthetic heavy tails and real models on real data.

Real gradients come from models trained for a few steps, then one more backward pass whose
per-layer gradients are captured:
* a small CNN on scikit-learn's digits (8x8 images);
* a character-level GRU language model on the source text of Python's own standard library,
  whose embedding gradient is sparse (rows of characters absent from the batch are exactly 0)
  and whose output layer is heavy-tailed.
"""

import os

import numpy as np
import torch


def synthetic(n=262_144, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "laplace": rng.laplace(size=n).astype(np.float32),
        "student_t3": rng.standard_t(3, n).astype(np.float32),
        "student_t2": rng.standard_t(2, n).astype(np.float32),
        # a layer whose rows (of 256) have scales spread over orders of magnitude, plus 0.1%
        # outliers 100 times the typical row's scale: what one scale per tensor cannot fit
        "row_scales_outliers": ((rng.normal(size=(n // 256, 256)) *
                                 rng.lognormal(0.0, 2.0, size=(n // 256, 1))).ravel() +
                                np.where(rng.random(n) < 1e-3, 100.0, 0.0)).astype(np.float32),
    }


def _capture(model, loss_fn, batches, steps=30, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = loss_fn(*batches(step))
        loss.backward()
        if step < steps:
            optimizer.step()
    return {name: p.grad.detach().numpy().reshape(-1).copy()
            for name, p in model.named_parameters() if p.grad is not None and p.numel() >= 1024}


def cnn_digits(seed=0):
    from sklearn.datasets import load_digits
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10))
    generator = torch.Generator().manual_seed(seed)

    def batches(_):
        index = torch.randint(0, len(x), (64,), generator=generator)
        return model(x[index]), y[index]

    return _capture(model, torch.nn.functional.cross_entropy, batches)


def stdlib_text(limit=400_000):
    """Bytes of Python's standard library sources: real text that ships with Python itself."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            chunks.append(data)
            total += len(data)
            if total >= limit:
                break
    return np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8)


class CharModel(torch.nn.Module):
    def __init__(self, vocab=256, dim=64, hidden=256):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, dim)
        self.gru = torch.nn.GRU(dim, hidden, batch_first=True)
        self.output = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens):
        hidden, _ = self.gru(self.embedding(tokens))
        return self.output(hidden)


def char_lm(seed=0, batch=32, length=64):
    torch.manual_seed(seed)
    text = torch.from_numpy(stdlib_text().astype(np.int64))
    model = CharModel()
    generator = torch.Generator().manual_seed(seed)

    def batches(_):
        starts = torch.randint(0, len(text) - length - 1, (batch,), generator=generator)
        window = torch.stack([text[s: s + length + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        return logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)

    return _capture(model, torch.nn.functional.cross_entropy, batches, lr=0.5)


def all_sources():
    """{source name: {layer name: flat float32 gradient}}."""
    sources = {f"synthetic/{k}": {"all": v} for k, v in synthetic().items()}
    sources["cnn_digits"] = cnn_digits()
    sources["char_lm_stdlib"] = char_lm()
    return sources
