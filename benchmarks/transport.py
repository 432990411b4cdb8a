"""Time the Gaussian -> GM Knothe-Rosenblatt map (`transport.gaussian_to_gm_samples`) at the latent shape.

Shape: the ImageNet latent GM, B=128, H=W=32, K=8, C=4, float32, one sample per pixel (the spectral
sampler's call). Inputs are drawn from a fixed numpy seed: unit-normal means, random log-weights,
per-sample log-stds uniform in [-1, 0].

Every implementation runs in its own worker process (this script with `--worker`), which builds the
inputs, compiles the jitted map (the compile time is reported), and then times one call per request
from this process. With `--old_src DIR` a second worker imports `gmflow_jax` from DIR (e.g. a worktree
of an older commit, `git worktree add /tmp/old <commit>`), and the two workers are timed alternately,
round by round, so that both see the same load on a shared machine. Reported per implementation: the
median wall time and the median CPU time of the worker (all its threads) per call and the best
(smallest) wall time, and with an old source the ratios old / new and the largest absolute
difference of the two outputs. The best time is the one least disturbed by other work on the
machine (on a shared host a compute-bound call can run ~2x slower for a while, CPU time included,
while the memory-bound old code slows less); the medians are what a user sees on the same machine.

    python benchmarks/transport.py                              # new code only
    python benchmarks/transport.py --old_src /tmp/old --rounds 15
    python benchmarks/transport.py --hlo                        # also fusion / instruction counts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

LATENT_SHAPE = dict(h=32, w=32, k=8, c=4)


def _make_inputs(batch: int, seed: int):
    """The benchmark GM and drivers as float32 numpy arrays (identical in every worker)."""
    h, w, k, c = (LATENT_SHAPE[n] for n in "hwkc")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(batch, h, w, k, c)).astype(np.float32)
    logits = rng.normal(size=(batch, h, w, k, 1))
    logweights = logits - np.log(np.sum(np.exp(logits), axis=-2, keepdims=True))
    logstds = rng.uniform(-1.0, 0.0, size=(batch, 1, 1, 1, 1))
    z = rng.normal(size=(batch, h, w, c))
    return means, logweights.astype(np.float32), logstds.astype(np.float32), z.astype(np.float32)


def _hlo_counts(text: str) -> str:
    """Number of fusions and of entry-computation instructions in an optimized HLO module."""
    entry = text[text.index("ENTRY") :]
    n_entry = sum(1 for line in entry.splitlines() if " = " in line)
    return f"{text.count('fusion(')} fusions, {n_entry} entry instructions"


def worker(batch: int, seed: int, hlo: bool) -> None:
    """Compile the map, then answer requests on stdin: `run` (time one call), `dump PATH`, `quit`."""
    import jax
    import jax.numpy as jnp

    from gmflow_jax import transport
    from gmflow_jax.gm import GM

    means, logweights, logstds, z = _make_inputs(batch, seed)
    gm = GM(jnp.asarray(means), jnp.asarray(logweights), jnp.asarray(logstds))
    z = jnp.asarray(z)
    t0 = time.perf_counter()
    compiled = jax.jit(transport.gaussian_to_gm_samples).lower(gm, z).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(gm, z))
    info = dict(source=os.path.dirname(os.path.dirname(transport.__file__)), compile_s=compile_s)
    if hlo:
        info["hlo"] = _hlo_counts(compiled.as_text())
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(compiled(gm, z))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(json.dumps(dict(wall=wall, cpu=cpu)), flush=True)
        elif cmd == "dump":
            np.save(arg, np.asarray(compiled(gm, z)))
            print("{}", flush=True)
        else:
            return


class _Worker:
    """A worker process importing `gmflow_jax` from `src` (None: this checkout)."""

    def __init__(self, name: str, src: str | None, args: argparse.Namespace):
        env = dict(os.environ)
        root = src or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + env.get("PYTHONPATH", "").split(os.pathsep))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker"]
        cmd += ["--batch", str(args.batch), "--seed", str(args.seed)] + ["--hlo"] * args.hlo
        self.name = name
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._read()
        if os.path.realpath(self.info["source"]) != os.path.realpath(root):
            raise RuntimeError(f"{name} worker imported gmflow_jax from {self.info['source']}")
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def request(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self) -> None:
        out = self.request("run")
        self.wall.append(out["wall"])
        self.cpu.append(out["cpu"])

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old_src", help="directory holding an older gmflow_jax to compare with")
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per implementation")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hlo", action="store_true", help="report fusion / instruction counts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.batch < 1:
        parser.error(f"--rounds and --batch must be >= 1, got {args.rounds} and {args.batch}")
    if args.worker:
        worker(args.batch, args.seed, args.hlo)
        return
    if args.old_src is not None and not os.path.isfile(
        os.path.join(args.old_src, "gmflow_jax", "transport.py")
    ):
        parser.error(f"--old_src {args.old_src!r} holds no gmflow_jax/transport.py")

    workers = [_Worker("new", None, args)]
    if args.old_src is not None:
        workers.insert(0, _Worker("old", args.old_src, args))
    for _ in range(args.rounds):
        for wk in workers:  # alternate: both see the same load
            wk.run()
    with tempfile.TemporaryDirectory() as tmp:
        outputs = []
        for wk in workers:
            path = os.path.join(tmp, wk.name + ".npy")
            wk.request(f"dump {path}")
            outputs.append(np.load(path))
    for wk in workers:
        wk.close()

    h, w, k, c = (LATENT_SHAPE[n] for n in "hwkc")
    print(f"gaussian_to_gm_samples, B={args.batch} H={h} W={w} K={k} C={c} float32, ")
    print(f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.2f} (1 min)\n")
    header = "| implementation | compile s | wall median ms | CPU median ms | wall best ms |"
    if args.hlo:
        header += " HLO |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for wk in workers:
        row = (
            f"| {wk.name} ({wk.info['source']}) | {wk.info['compile_s']:.1f} "
            f"| {1e3 * statistics.median(wk.wall):.1f} | {1e3 * statistics.median(wk.cpu):.1f} "
            f"| {1e3 * min(wk.wall):.1f} |"
        )
        print(row + (f" {wk.info['hlo']} |" if args.hlo else ""))
    if len(workers) == 2:
        old, new = workers
        wall_ratio = statistics.median(old.wall) / statistics.median(new.wall)
        cpu_ratio = statistics.median(old.cpu) / statistics.median(new.cpu)
        best_ratio = min(old.wall) / min(new.wall)
        diff = float(np.max(np.abs(outputs[0].astype(np.float64) - outputs[1])))
        print(
            f"\nold / new: wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x (medians), best wall "
            f"{best_ratio:.2f}x; max |old - new| {diff:.3g}"
        )


if __name__ == "__main__":
    main()
