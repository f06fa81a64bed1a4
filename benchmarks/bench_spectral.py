"""P6: training-step time of thunderline's spectral norm vs torch's, and its overhead.

Times one optimiser step (zero_grad, forward, cross-entropy, backward, Adam step) for:

* MLP (64 → 3×128 → 10, digits-sized): no SN, torch ``parametrizations.spectral_norm``, ours;
* CNN (1×8×8, 3 conv blocks of 32 channels, max pooling, GAP, linear head): no SN, torch SN,
  ours in ``matrix`` mode (same quantity as torch) and ours in ``operator`` mode.

SN is on every Linear/Conv (first, hidden, output), one power iteration per step. Variants
are run interleaved (round-robin, order rotated each round) and the per-round mean step
time is summarised by its median over rounds. Goals: ours / torch ≤ 1.0 (MLP and CNN) and
operator-mode CNN / unconstrained CNN ≤ 1.25.

Runs single-threaded by default: on a shared 2-core machine torch's intra-op threads spin
against other processes and the quartiles of small-op workloads spread by 5-10×, which makes
the medians meaningless. ``--threads 0`` keeps torch's default.

Usage::

    .venv/bin/python benchmarks/bench_spectral.py [--rounds 100] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from thunderline_lab.models import ModelConfig, build_model

__all__ = ["Variant", "main", "make_variants"]

MLP = ModelConfig(architecture="mlp", depth=3, width=128)
CNN = ModelConfig(architecture="cnn", depth=3, width=32, pooling="max")
MLP_SHAPE, CNN_SHAPE, N_CLASSES = (64,), (1, 8, 8), 10


@dataclass
class Variant:
    """One model under test with its optimiser and fixed batch."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()


def _with_torch_sn(config: ModelConfig, shape: tuple[int, ...]) -> nn.Module:
    model = build_model(replace(config, spectral_norm=False), shape, N_CLASSES, seed=0)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            torch_spectral_norm(module, n_power_iterations=config.n_power_iterations)
    return model


def make_variants(batch: int) -> list[Variant]:
    """The seven benchmark variants, each with its own Adam optimiser and a fixed batch."""
    g = torch.Generator().manual_seed(0)
    builders: list[tuple[str, tuple[int, ...], Callable[[], nn.Module]]] = [
        ("mlp/none", MLP_SHAPE, lambda: build_model(MLP, MLP_SHAPE, N_CLASSES, seed=0)),
        ("mlp/torch-sn", MLP_SHAPE, lambda: _with_torch_sn(MLP, MLP_SHAPE)),
        (
            "mlp/ours",
            MLP_SHAPE,
            lambda: build_model(replace(MLP, spectral_norm=True), MLP_SHAPE, N_CLASSES, seed=0),
        ),
        ("cnn/none", CNN_SHAPE, lambda: build_model(CNN, CNN_SHAPE, N_CLASSES, seed=0)),
        ("cnn/torch-sn", CNN_SHAPE, lambda: _with_torch_sn(CNN, CNN_SHAPE)),
        (
            "cnn/ours-matrix",
            CNN_SHAPE,
            lambda: build_model(
                replace(CNN, spectral_norm=True, conv_sn_mode="matrix"),
                CNN_SHAPE,
                N_CLASSES,
                seed=0,
            ),
        ),
        (
            "cnn/ours-operator",
            CNN_SHAPE,
            lambda: build_model(
                replace(CNN, spectral_norm=True, conv_sn_mode="operator"),
                CNN_SHAPE,
                N_CLASSES,
                seed=0,
            ),
        ),
    ]
    variants = []
    for name, shape, build in builders:
        model = build().train()
        x = torch.randn((batch, *shape), generator=g)
        y = torch.randint(0, N_CLASSES, (batch,), generator=g)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        variants.append(Variant(name, model, opt, x, y))
    return variants


def _time(variant: Variant, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        variant.step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print medians and ratios; returns the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds (default 100)")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per variant")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    variants = make_variants(args.batch)
    for v in variants:
        for _ in range(args.warmup):
            v.step()
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            samples[v.name].append(_time(v, args.steps))

    med = {name: statistics.median(ts) for name, ts in samples.items()}
    print(
        f"P6 spectral-norm step time: batch {args.batch}, {args.rounds} interleaved rounds × "
        f"{args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'variant':<20} {'median µs/step':>15} {'q1':>9} {'q3':>9}")
    for name, ts in samples.items():
        q1, _, q3 = statistics.quantiles(ts, n=4)
        print(f"{name:<20} {med[name] * 1e6:>15.1f} {q1 * 1e6:>9.1f} {q3 * 1e6:>9.1f}")

    pairs = {
        "mlp ours / torch-sn": ("mlp/ours", "mlp/torch-sn"),
        "cnn ours-matrix / torch-sn": ("cnn/ours-matrix", "cnn/torch-sn"),
        "cnn ours-operator / torch-sn": ("cnn/ours-operator", "cnn/torch-sn"),
        "cnn ours-operator / none": ("cnn/ours-operator", "cnn/none"),
    }
    ratios = {key: med[a] / med[b] for key, (a, b) in pairs.items()}
    # Same-round ratios share the machine's state at that moment: their median is a
    # second, drift-robust estimate of the same quantity.
    paired = {
        key: statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))
        for key, (a, b) in pairs.items()
    }
    goals = {
        "mlp ours / torch-sn": 1.0,
        "cnn ours-matrix / torch-sn": 1.0,
        "cnn ours-operator / none": 1.25,
    }
    print("one-off cost of the first eval forward after training (solves v_eval):")
    for v in variants:
        if "ours" not in v.name:
            continue
        v.model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            v.model(v.x)  # solve + forward
            mid = time.perf_counter()
            v.model(v.x)  # forward only
            end = time.perf_counter()
        print(f"  {v.name:<20} {((mid - start) - (end - mid)) * 1e3:8.2f} ms")
    print(f"ratios: {'':<23} {'of medians':>10} {'paired':>8}")
    for key, value in ratios.items():
        goal = goals.get(key)
        verdict = ""
        if goal is not None:
            marks = ["met" if r <= goal else "MISSED" for r in (value, paired[key])]
            verdict = f"goal ≤ {goal:.2f}: {marks[0]} / {marks[1]}"
        print(f"  {key:<30} {value:10.3f} {paired[key]:8.3f}  {verdict}")
    return ratios


if __name__ == "__main__":
    main()
