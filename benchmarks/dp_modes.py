"""Per-step cost of DP-SGD against plain SGD for the CNN, for each Opacus grad-sample mode, and whether each
mode is exact (the same clipped, noise-free gradient as the reference `hooks` mode).

    .venv/bin/python -m benchmarks.dp_modes --batch-sizes 64 256 --out benchmarks/results/dp_modes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client import load_dataset
from models import build_model

MODES = ("hooks", "ghost", "functorch", "ew")


def _private(mode: str, x: torch.Tensor, y: torch.Tensor, batch: int, noise: float):  # noqa: ANN202
    model = build_model("cnn", load_dataset("fashion-mnist").spec, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = PrivacyEngine().make_private(module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                                           data_loader=loader, noise_multiplier=noise, max_grad_norm=1.0,
                                           poisson_sampling=False, grad_sample_mode=mode)
    if mode == "ghost":
        return out[0], out[1], out[2]
    return out[0], out[1], nn.CrossEntropyLoss()


def clipped_gradient(mode: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One noise-free DP step's summed clipped gradient (what the optimizer would add noise to)."""
    model, optimizer, criterion = _private(mode, x, y, len(y), noise=0.0)
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        criterion(model(x), y).backward()
        optimizer.pre_step()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def interleaved_median(steps_by_name: dict, repeats: int, steps: int) -> dict[str, float]:
    """Seconds per step, median over `repeats` rounds that take every variant in turn: a load that comes and
    goes on a shared 2-core machine then hits all variants alike instead of skewing one."""
    for step in steps_by_name.values():
        step()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            started = time.perf_counter()
            for _ in range(steps):
                step()
            samples[name].append((time.perf_counter() - started) / steps)
    return {name: statistics.median(v) for name, v in samples.items()}


def measure(batch: int, steps: int, repeats: int) -> list[dict]:
    ds = load_dataset("fashion-mnist")
    x, y = torch.from_numpy(ds.x_train[:batch].copy()), torch.from_numpy(ds.y_train[:batch].copy())
    plain = build_model("cnn", ds.spec, seed=0)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)

    def plain_step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()

    variants = {"plain SGD": plain_step}
    errors, exact = {}, {}
    reference = clipped_gradient("hooks", x[:32], y[:32])
    for mode in MODES:
        try:
            model, optimizer, criterion = _private(mode, x, y, batch, noise=1.0)

            def dp_step(model=model, optimizer=optimizer, criterion=criterion) -> None:  # noqa: ANN001
                optimizer.zero_grad()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    criterion(model(x), y).backward()
                optimizer.step()

            dp_step()
            grads = clipped_gradient(mode, x[:32], y[:32])
            exact[mode] = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                              for a, b in zip(grads, reference, strict=True))
            variants[mode] = dp_step
        except Exception as exc:  # a mode Opacus cannot run on this model is a result too
            errors[mode] = f"{type(exc).__name__}: {exc}"[:200]
    seconds = interleaved_median(variants, repeats, steps)
    base = seconds["plain SGD"]
    rows = [{"batch": batch, "mode": name, "ms_per_step": round(s * 1e3, 1), "vs_plain": round(s / base, 2),
             "exact": exact.get(name, True)} for name, s in seconds.items()]
    rows += [{"batch": batch, "mode": mode, "error": err} for mode, err in errors.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=5, help="steps per timing sample")
    parser.add_argument("--repeats", type=int, default=7, help="timing samples per variant (median taken)")
    parser.add_argument("--out", default="benchmarks/results/dp_modes.json")
    args = parser.parse_args()
    rows = [row for b in args.batch_sizes for row in measure(b, args.steps, args.repeats)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
