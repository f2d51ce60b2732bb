"""Per-step cost of DP-SGD against plain SGD for each grad-sample mode (book-keeping `bk`, client/bookkeeping.py,
and Opacus' modes), per model and batch size, and whether each mode is exact (the same clipped, noise-free
gradient as the reference Opacus `hooks` mode, rtol 1e-4). Optionally a whole DP epoch against a plain epoch.

    .venv/bin/python -m benchmarks.dp_modes --models cnn resnet transformer --batch-sizes 64 256 1024 \
        --out benchmarks/results/dp_modes_bk.json
    .venv/bin/python -m benchmarks.dp_modes --models --epoch-examples 60000 --out benchmarks/results/dp_epoch_bk.json

Timings: wall-clock and process CPU seconds per step, medians over `repeats` samples of `steps` steps, every
variant taken in turn within each sample so that a passing load hits all alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.bookkeeping import BookKeeper, NoisyStep
from client.dpsgd import train_private
from common import load_dataset
from common.allocator import keep_freed_memory
from common.config import TrainConfig
from common.training import train
from models import build_model

OPACUS_MODES = ("hooks", "ghost", "functorch", "ew")
DATASET = {"cnn": "fashion-mnist", "resnet": "fashion-mnist", "transformer": "shakespeare", "mlp": "fashion-mnist"}


def _private(name: str, spec, mode: str, x: torch.Tensor, y: torch.Tensor, batch: int, noise: float):  # noqa: ANN001, ANN202
    model = build_model(name, spec, seed=0)
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


def _bk_step(name: str, spec, batch: int, noise: float) -> NoisyStep:  # noqa: ANN001
    model = build_model(name, spec, seed=0)
    return NoisyStep(BookKeeper(model), torch.optim.SGD(model.parameters(), lr=0.05), max_grad_norm=1.0,
                     noise_std=noise, expected_batch=batch, noise=torch.Generator().manual_seed(0))


def clipped_gradient(name: str, spec, mode: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    """One noise-free DP step's summed clipped gradient (what the optimizer would add noise to)."""
    if mode == "bk":
        model = build_model(name, spec, seed=0)
        keeper = BookKeeper(model)
        sums, _, _ = keeper.clipped_sum(x, y, 1.0)
        keeper.close()
        return [sums.get(p, torch.zeros_like(p)) / len(y) for p in model.parameters() if p.requires_grad]
    model, optimizer, criterion = _private(name, spec, mode, x, y, len(y), noise=0.0)
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        criterion(model(x), y).backward()
        optimizer.pre_step()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def interleaved_median(steps_by_name: dict[str, Callable[[], object]], repeats: int,
                       steps: int) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per step, medians over `repeats` rounds that take every variant in turn: a load that
    comes and goes on a shared machine then hits all variants alike instead of skewing one."""
    for step in steps_by_name.values():
        step()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in steps_by_name}
    cpu: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step()
            wall[name].append((time.perf_counter() - started) / steps)
            cpu[name].append((time.process_time() - cpu_started) / steps)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps_by_name}


def measure(name: str, batch: int, modes: list[str], steps: int, repeats: int) -> list[dict]:
    ds = load_dataset(DATASET[name])
    x, y = torch.from_numpy(ds.x_train[:batch].copy()), torch.from_numpy(ds.y_train[:batch].copy())
    plain = build_model(name, ds.spec, seed=0)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)

    def plain_step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()

    variants: dict[str, Callable[[], object]] = {"plain SGD": plain_step}
    errors, exact = {}, {}
    reference = clipped_gradient(name, ds.spec, "hooks", x[:32], y[:32])
    for mode in modes:
        try:
            if mode == "bk":
                step = _bk_step(name, ds.spec, batch, noise=1.0)

                def dp_step(step=step) -> None:  # noqa: ANN001
                    step(x, y)
            else:
                model, optimizer, criterion = _private(name, ds.spec, mode, x, y, batch, noise=1.0)

                def dp_step(model=model, optimizer=optimizer, criterion=criterion) -> None:  # noqa: ANN001
                    optimizer.zero_grad()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        criterion(model(x), y).backward()
                    optimizer.step()

            dp_step()
            grads = clipped_gradient(name, ds.spec, mode, x[:32], y[:32])
            exact[mode] = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                              for a, b in zip(grads, reference, strict=True))
            variants[mode] = dp_step
        except Exception as exc:  # a mode Opacus cannot run on this model is a result too
            errors[mode] = f"{type(exc).__name__}: {exc}"[:200]
    seconds = interleaved_median(variants, repeats, steps)
    base_wall, base_cpu = seconds["plain SGD"]
    rows = [{"model": name, "batch": batch, "mode": mode, "ms_per_step": round(w * 1e3, 1),
             "vs_plain": round(w / base_wall, 2), "cpu_ms_per_step": round(c * 1e3, 1),
             "cpu_vs_plain": round(c / base_cpu, 2), "exact": exact.get(mode, True)}
            for mode, (w, c) in seconds.items()]
    rows += [{"model": name, "batch": batch, "mode": mode, "error": err} for mode, err in errors.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def measure_epoch(examples: int, batch: int, repeats: int, modes: list[str]) -> list[dict]:
    """A whole local epoch of the cnn on `examples` Fashion-MNIST images: plain SGD against DP-SGD (noise 1.0,
    C 1.0, Poisson sampling), interleaved, as a client runs them (common.training.train, client.dpsgd)."""
    ds = load_dataset("fashion-mnist")
    x, y = ds.x_train[:examples], ds.y_train[:examples]
    cfg = TrainConfig(model="cnn", batch_size=batch, learning_rate=0.5, momentum=0.5)
    start = build_model("cnn", ds.spec, seed=0)

    def run(mode: str | None) -> Callable[[], object]:
        def epoch() -> object:
            model = copy.deepcopy(start)
            if mode is None:
                return train(model, x, y, cfg, seed=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return train_private(model, x, y, cfg, noise_multiplier=1.0, max_grad_norm=1.0, seed=0,
                                     grad_sample_mode=mode)
        return epoch

    variants = {"plain SGD": run(None), **{mode: run(mode) for mode in modes}}
    seconds = interleaved_median(variants, repeats, 1)
    base_wall, base_cpu = seconds["plain SGD"]
    rows = [{"epoch_examples": examples, "batch": batch, "mode": mode, "s_per_epoch": round(w, 2),
             "vs_plain": round(w / base_wall, 2), "cpu_s_per_epoch": round(c, 2),
             "cpu_vs_plain": round(c / base_cpu, 2)} for mode, (w, c) in seconds.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["cnn"], choices=sorted(DATASET))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--modes", nargs="+", default=["bk", "ghost", "hooks"], choices=["bk", *OPACUS_MODES])
    parser.add_argument("--steps", type=int, default=3, help="steps per timing sample")
    parser.add_argument("--repeats", type=int, default=7, help="timing samples per variant (median taken)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the clients' CPU share)")
    parser.add_argument("--epoch-examples", type=int, default=0, help="also time a whole epoch on this many images")
    parser.add_argument("--epoch-batch", type=int, default=256)
    parser.add_argument("--epoch-modes", nargs="+", default=["bk"], choices=["bk", *OPACUS_MODES])
    parser.add_argument("--out", default="benchmarks/results/dp_modes_bk.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as client training does (common/allocator.py): plain and DP steps alike
    load = os.getloadavg()
    rows = [row for m in args.models for b in args.batch_sizes for row in measure(m, b, args.modes, args.steps,
                                                                                   args.repeats)]
    if args.epoch_examples:
        rows += measure_epoch(args.epoch_examples, args.epoch_batch, args.repeats, args.epoch_modes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "loadavg_start": load,
                                          "loadavg_end": os.getloadavg(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
