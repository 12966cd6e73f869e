"""How well does the cost model predict real runs on this machine?

Profiles the machine (`ditplan profile`, or reuses `--profile PATH`), builds tiny model families
sized so that compute dominates (PixArt: cross-attention blocks; SD3: MM-DiT joint blocks; both
with classifier-free guidance; `--families pixart,sd3,hunyuan` adds HunyuanDiT's skip blocks), runs each configuration for real with `ditplan run`, predicts it
with `ditplan simulate --cluster <profile>` from the same model YAML, and prints the table
(config, measured, predicted, error) with the median absolute percentage error, the worst error,
Kendall's tau between the predicted and the measured order, the same figures for the warmup-0
PipeFusion plans, and the error per component (compute, communication, waiting) where run.json
carries each rank's measured totals (predicted waiting: PipeFusion's bubbles and the wait for the
slowest rank).

    .venv/bin/python benchmarks/fidelity.py [--profile PATH] [--rounds 3] [--csv fidelity.csv] [--out DIR]

This machine's speed drifts by 10-20 % over minutes (a shared virtual machine), so every
configuration runs once per round, in a new shuffled order each round (`--seed`), each round after a
fresh profile, and each row is the median over the rounds (`--rounds`, default 3; about 7 minutes a
round on 2 cores).

Nothing here is fitted to these runs: the predictions use only the profile's measurements (GEMM,
attention, elementwise and activation curves, per-operator host cost, gloo tables, the wait for the
slowest of two synchronized processes) and the model YAML. Measured = the denoising loop of run.json
(`latency.loop_s`), the quantity `latency_s` predicts. Runs are traced (`ditplan run --trace`), so run.json carries each rank's measured
compute, communication and waiting, which the per-component figures compare with the prediction's;
`--compute-split` adds a load-independent compute check for every configuration: the CPU time the
run's processes spend per denoising step (the difference between a 3-step and a full run, so start-up
cancels; divided by the process count), against the predicted compute per step and rank.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DITPLAN = [sys.executable, "-m", "planner"]

# Heavier variants of the tiny recipes: hidden 384 (6 heads x 64, a head dimension real DiTs use),
# 512x512 images (1024 image tokens), a handful of blocks. One step of PixArt then takes ~0.5 s of
# GEMMs and attention on one thread, far above the per-operator and per-step host costs.
FAMILIES = {
    "pixart": ("tiny-pixart-alpha", "tiny-pixart-alpha-fidelity",
               {"num_attention_heads": 6, "attention_head_dim": 64, "cross_attention_dim": 384, "sample_size": 64,
                "num_layers": 4}),
    "sd3": ("tiny-sd3-medium", "tiny-sd3-medium-fidelity",
            {"num_attention_heads": 6, "attention_head_dim": 64, "caption_projection_dim": 384, "sample_size": 64,
             "pos_embed_max_size": 64, "num_layers": 3}),
}
# HunyuanDiT (cross-attention blocks with long skips, rotary embeddings) as an alternative family.
FAMILIES["hunyuan"] = ("tiny-hunyuan-dit", "tiny-hunyuan-dit-fidelity",
                       {"num_attention_heads": 6, "attention_head_dim": 64, "hidden_size": 384, "sample_size": 64,
                        "num_layers": 4})
STOLEN_NOTICE = 0.05  # a median steal share above this makes the wall-clock errors a measure of the host, not the model
SHORT_STEPS = 3  # the --compute-split run: past PipeFusion's warmup (<= 2 here), start-up cost the same
SIZE = {"default_height": 512, "default_width": 512, "default_steps": 6}

# (config, processes): every 1- and 2-process method, then 4-process hybrids.
CONFIGS_1_2 = [
    ("cfg=1", 1),
    ("cfg=2", 2),
    ("ulysses=2", 2),
    ("ring=2", 2),
    ("pipefusion=2,patches=2,warmup=1", 2),
    ("pipefusion=2,patches=4,warmup=1", 2),
    ("pipefusion=2,patches=8,warmup=1", 2),
    ("pipefusion=2,patches=4,warmup=2", 2),
    # Without warmup the first patch step starts from empty stale-K/V buffers (the search's default
    # floor keeps warmup >= 1; these predict what `--min-warmup 0` would pick).
    ("pipefusion=2,patches=2,warmup=0", 2),
    ("pipefusion=2,patches=4,warmup=0", 2),
]
CONFIGS_4 = [
    ("cfg=2,ulysses=2", 4),
    ("cfg=2,pipefusion=2,patches=4,warmup=1", 4),
    ("cfg=2,pipefusion=2,patches=4,warmup=0", 4),
    ("ulysses=2,ring=2", 4),
]


@dataclass
class Row:
    family: str
    config: str
    nproc: int
    measured_s: float
    predicted_s: float
    predicted_compute_s: float
    predicted_comm_s: float
    step_median_s: float
    load: float  # 1-minute load average when the run started (other processes sharing the cores)
    stolen: float = 0.0  # share of the machine's CPU time the hypervisor took during the run (steal)
    cpu_per_step_s: float = math.nan  # measured CPU seconds per step and process (--compute-split)
    predicted_cpu_per_step_s: float = math.nan
    # Each rank's measured totals from run.json (`per_rank[i]["timeline"]`: compute_s, communication_s, waiting_s),
    # averaged over ranks; NaN where the run did not record them.
    measured_parts: dict[str, float] | None = None
    predicted_waiting_s: float = 0.0

    @property
    def warmup(self) -> int | None:
        parts = dict(part.split("=") for part in self.config.split(","))
        return int(parts["warmup"]) if "warmup" in parts else None

    @property
    def compute_error(self) -> float:
        return self.cpu_per_step_s / self.predicted_cpu_per_step_s - 1.0

    @property
    def error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


def run_command(argv: list[str], timeout: float | None, capture: bool = True) -> subprocess.CompletedProcess:
    """Run one command in its own process group; a timeout, Ctrl-C or SIGTERM stops the whole group
    (`ditplan run` starts the executor, which starts torchrun's workers)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    pipe = subprocess.PIPE if capture else None
    process = subprocess.Popen(argv, cwd=ROOT, stdout=pipe, stderr=pipe, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def profile_covers(profile: Path) -> set[int]:
    import yaml

    data = yaml.safe_load(profile.read_text())
    return {1} | {entry["ranks"] for entry in data.get("measured", {}).get("communication", [])}


def ensure_profile(path: Path | None, work: Path) -> Path:
    if path is not None:
        if not path.is_file():
            sys.exit(f"fidelity: --profile {path} does not exist")
        return path
    work.mkdir(parents=True, exist_ok=True)
    path = work / "profile.yaml"
    print(f"profiling this machine -> {path}", flush=True)
    done = run_command([*DITPLAN, "profile", "--out", str(path)], timeout=None, capture=False)
    if done.returncode != 0:
        sys.exit("fidelity: ditplan profile failed")
    return path


def build_models(work: Path, families: list[str]) -> dict[str, Path]:
    """Write each family's heavier model YAML (figures measured from the built modules)."""
    from executor.tiny import derive_spec, write_model_yaml

    paths = {}
    for family in families:
        base, new_id, overrides = FAMILIES[family]
        path = work / "models" / f"{new_id}.yaml"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_model_yaml(derive_spec(base, new_id, transformer=overrides, defaults=SIZE), path)
        paths[family] = path
    return paths


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished descendant (each level waits for its children:
    ditplan run -> executor -> torchrun's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


COMPONENTS = ("compute_s", "communication_s", "waiting_s")


def measured_parts(record: dict) -> dict[str, float] | None:
    """The mean over ranks of each component of run.json's per-rank timeline totals (written with
    `ditplan run --trace`; None without them)."""
    ranks = [entry.get("timeline") for entry in record.get("per_rank") or [] if isinstance(entry, dict)]
    ranks = [entry for entry in ranks if isinstance(entry, dict)]
    if not ranks or not all(all(key in entry for key in COMPONENTS) for entry in ranks):
        return None
    return {key: statistics.fmean(float(entry[key]) for entry in ranks) for key in COMPONENTS}


def measure(model: Path, config: str, nproc: int, out: Path, steps: int) -> tuple[float, float, float, dict | None] | str:
    """(denoising loop seconds, median step seconds or NaN, CPU seconds of all processes, measured
    per-component totals or None) of one real run, or the refusal text."""
    cpu_before = children_cpu_seconds()
    done = run_command([*DITPLAN, "run", "--model", str(model), "--plan", config, "--nproc", str(nproc),
                        "--out", str(out), "--steps", str(steps), "--seed", "0", "--trace", str(out) + ".trace.json"],
                       timeout=600)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if "error" in line.lower()]
        return (lines or (done.stderr or done.stdout).strip().splitlines() or ["failed"])[-1]
    record = json.loads((out / "run.json").read_text())
    steps = record["latency"].get("step_s") or []  # PipeFusion runs do not time single steps
    return (record["latency"]["loop_s"], statistics.median(steps) if steps else math.nan,
            children_cpu_seconds() - cpu_before, measured_parts(record))


def predicted_compute_per_step(predicted: dict, steps: int) -> float:
    """Seconds one rank computes per denoising step: all steps' compute, or (PipeFusion) the
    bottleneck stage's compute per pipelined step."""
    breakdown = predicted["breakdown"]
    if "warmup_s" in breakdown:
        config = dict(part.split("=") for part in predicted["config"].split(","))
        return breakdown["compute_s"] / max(1, steps - int(config["warmup"]))
    return breakdown["compute_s"] / steps


def predict(model: Path, profile: Path, config: str, nproc: int, steps: int) -> dict:
    done = run_command([*DITPLAN, "simulate", "--model", str(model), "--cluster", str(profile), "--gpus", str(nproc),
                        "--config", config, "--steps", str(steps), "--format", "json"], timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"ditplan simulate {config}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def run_and_predict(model: Path, family: str, config: str, nproc: int, out: Path, profile: Path,
                    args: argparse.Namespace) -> Row | str:
    """One real run of the configuration and its prediction from `profile` (or the refusal text)."""
    load = os.getloadavg()[0]
    stolen_before, wall_before = stolen_seconds(), time.perf_counter()
    result = measure(model, config, nproc, out, args.steps)
    stolen = (stolen_seconds() - stolen_before) / ((time.perf_counter() - wall_before) * (os.cpu_count() or 1))
    if isinstance(result, str):
        return result
    loop_s, step_s, cpu_s, parts = result
    predicted = predict(model, profile, config, nproc, args.steps)
    breakdown = predicted["breakdown"]
    comm = breakdown.get("communication_s", 0.0)
    waiting = breakdown.get("bubble_s", 0.0) + breakdown.get("straggle_s", 0.0)
    row = Row(family, config, nproc, loop_s, predicted["latency_s"], predicted["latency_s"] - comm - waiting, comm,
              step_s, load, stolen, measured_parts=parts, predicted_waiting_s=waiting)
    if args.compute_split:
        short = measure(model, config, nproc, out.with_name(out.name + "-short"), SHORT_STEPS)
        if not isinstance(short, str):
            row.cpu_per_step_s = (cpu_s - short[2]) / (args.steps - SHORT_STEPS) / nproc
            row.predicted_cpu_per_step_s = predicted_compute_per_step(predicted, args.steps)
    return row


def median_row(series: list[Row]) -> Row:
    """One configuration's runs over the rounds as one row: the median of every figure (of each
    measured component too), the same family, configuration and process count."""

    def median(values: list[float]) -> float:
        finite = [value for value in values if math.isfinite(value)]
        return statistics.median(finite) if finite else math.nan

    figures: dict = {}
    for field in dataclasses.fields(Row):
        column = [getattr(row, field.name) for row in series]
        if field.name == "measured_parts":
            parts = [value for value in column if value is not None]
            figures[field.name] = {key: median([p[key] for p in parts]) for key in COMPONENTS} if parts else None
        elif field.type == "float":
            figures[field.name] = median(column)
        else:
            figures[field.name] = column[0]
    return Row(**figures)


def repeatability(runs: dict[tuple[str, str], list[Row]]) -> list[float]:
    """Kendall's tau between the measured orders of every two rounds, over the configurations every
    round ran: how well this machine reproduces its own order, which bounds how well any prediction
    can match one round's."""
    complete = [series for series in runs.values() if len(series) == max(map(len, runs.values()))]
    rounds = len(complete[0]) if complete else 0
    return [kendall_tau([series[a].measured_s for series in complete], [series[b].measured_s for series in complete])
            for a in range(rounds) for b in range(a + 1, rounds)]


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(xs, ys).statistic) if len(xs) > 1 else math.nan


def component_errors(rows: list[Row]) -> dict[str, list[float]]:
    """Per component, the absolute errors (seconds relative to the measured loop) of the rows that
    measured it: predicted minus measured seconds of that component, over the measured loop time, so
    a component that is small costs little however wrong."""
    out: dict[str, list[float]] = {key: [] for key in COMPONENTS}
    for row in rows:
        if row.measured_parts is None:
            continue
        predicted = {"compute_s": row.predicted_compute_s, "communication_s": row.predicted_comm_s,
                     "waiting_s": row.predicted_waiting_s}
        for key in COMPONENTS:
            out[key].append(abs(predicted[key] - row.measured_parts[key]) / row.measured_s)
    return out


def summary(rows: list[Row]) -> dict[str, float]:
    errors = [abs(row.error) for row in rows]
    single = [abs(row.error) for row in rows if row.nproc == 1]
    parallel = [abs(row.error) for row in rows if row.nproc > 1]
    no_warmup = [row for row in rows if row.warmup == 0]
    return {
        "warmup0_median_abs_error": statistics.median(abs(r.error) for r in no_warmup) if no_warmup else math.nan,
        "warmup0_configurations": len(no_warmup),
        "configurations": len(rows),
        "median_abs_error": statistics.median(errors),
        "worst_abs_error": max(errors),
        "kendall_tau": kendall_tau([row.predicted_s for row in rows], [row.measured_s for row in rows]),
        "compute_only_median_abs_error": statistics.median(single) if single else math.nan,
        "parallel_median_abs_error": statistics.median(parallel) if parallel else math.nan,
    }


def print_table(rows: list[Row], skipped: list[tuple[str, str, str]]) -> None:
    headers = ("family", "config", "procs", "measured_s", "predicted_s", "error", "pred. comm share", "load", "stolen")
    table = [(r.family, r.config, str(r.nproc), f"{r.measured_s:.3f}", f"{r.predicted_s:.3f}", f"{r.error * 100:+.1f} %",
              f"{r.predicted_comm_s / r.predicted_s * 100:.0f} %" if r.predicted_s else "-", f"{r.load:.1f}",
              f"{r.stolen * 100:.0f} %") for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    for family, config, reason in skipped:
        print(f"skipped {family} {config}: {reason}")


def write_csv(path: Path, rows: list[Row]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["family", "config", "nproc", "measured_s", "predicted_s", "error",
                         "predicted_compute_s", "predicted_comm_s", "measured_step_median_s", "load_average",
                         "cpu_per_step_s", "predicted_cpu_per_step_s", "stolen_share"])
        for r in rows:
            writer.writerow([r.family, r.config, r.nproc, f"{r.measured_s:.6f}", f"{r.predicted_s:.6f}",
                             f"{r.error:.4f}", f"{r.predicted_compute_s:.6f}", f"{r.predicted_comm_s:.6f}",
                             f"{r.step_median_s:.6f}", f"{r.load:.2f}", f"{r.cpu_per_step_s:.6f}",
                             f"{r.predicted_cpu_per_step_s:.6f}", f"{r.stolen:.3f}"])


def stolen_seconds() -> float:
    """CPU seconds the hypervisor has taken from this virtual machine since boot (the `steal` column
    of /proc/stat; 0 where the kernel does not report it). On a shared host a run's wall-clock time
    grows by what is stolen, which no profile of this machine's rates can predict."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return float(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    except (OSError, ValueError):
        return 0.0


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, help="reuse this profile instead of profiling first")
    parser.add_argument("--out", type=Path, help="work folder for models and runs (default: a temporary folder)")
    parser.add_argument("--csv", type=Path, help="write the table as CSV (config, measured_s, predicted_s, ...)")
    parser.add_argument("--families", default="pixart,sd3", help="model families (default: pixart,sd3)")
    parser.add_argument("--steps", type=int, default=SIZE["default_steps"], help="denoising steps per run (default 6)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run every configuration this many times, each round after a fresh profile; a row is "
                             "the median over rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of each round's shuffled run order (default 0)")
    parser.add_argument("--max-procs", type=int, default=4, help="largest process count to run (default 4, if profiled)")
    parser.add_argument("--compute-split", action="store_true",
                        help=f"also run each configuration for {SHORT_STEPS} steps and compare CPU time per step with "
                             "the predicted compute (independent of other load on the machine)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: it must be at least 1")
    if args.compute_split and args.steps <= SHORT_STEPS:
        parser.error(f"--compute-split needs --steps > {SHORT_STEPS}")
    signal.signal(signal.SIGTERM, _interrupt)

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    work = args.out or Path(tempfile.mkdtemp(prefix="ditplan-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)", flush=True)
    profile = ensure_profile(args.profile, work)
    covered = profile_covers(profile)
    # More processes than cores would time-share cores, which the profile (one core per process) does
    # not describe; such configurations are left out rather than predicted wrongly.
    cores = os.cpu_count() or 1
    configs = [c for c in CONFIGS_1_2 + CONFIGS_4 if c[1] in covered and c[1] <= min(args.max_procs, cores)]
    left_out = sorted({n for _, n in CONFIGS_1_2 + CONFIGS_4} - {n for _, n in configs})
    if left_out:
        print(f"leaving out {', '.join(map(str, left_out))}-process configurations: the profile covers "
              f"{sorted(covered)} processes, this machine has {cores} cores", flush=True)
    models = build_models(work, families)

    # Each round profiles the machine again (unless --profile) and runs every configuration once, so
    # each run is predicted from rates measured minutes before it, and a slow spell of the host
    # touches one run of a configuration rather than all of them; a row is the median over rounds.
    runs: dict[tuple[str, str], list[Row]] = {}
    skipped: list[tuple[str, str, str]] = []
    for round_index in range(args.rounds):
        if round_index:
            profile = ensure_profile(args.profile, work / f"round-{round_index}")
        print(f"round {round_index + 1} of {args.rounds}", flush=True)
        # A new order every round: a slow spell of the host then lands on different configurations
        # each time instead of always on those that run late in a round.
        order = [(family, config, nproc) for family in families for config, nproc in configs]
        random.Random(args.seed * 1000 + round_index).shuffle(order)
        for family, config, nproc in order:
            if any(f == family and c == config for f, c, _ in skipped):
                continue
            name = f"{family}-{config.replace('=', '').replace(',', '-')}-{round_index}"
            row = run_and_predict(models[family], family, config, nproc, work / "runs" / name, profile, args)
            if isinstance(row, str):
                skipped.append((family, config, row))
                print(f"  {family:7s} {config:40s} skipped: {row}", flush=True)
                continue
            runs.setdefault((family, config), []).append(row)
            extra = f"  compute/step {row.compute_error * 100:+6.1f} %" if args.compute_split else ""
            print(f"  {family:7s} {config:40s} measured {row.measured_s:7.3f} s  predicted {row.predicted_s:7.3f} s  "
                  f"{row.error * 100:+6.1f} %{extra}", flush=True)
    # The table in the configurations' own order, whatever order the rounds ran them in.
    rows = [median_row(runs[family, config]) for family in families for config, _ in configs if (family, config) in runs]
    if not rows:
        print("fidelity: no configuration ran", file=sys.stderr)
        return 1
    print()
    print_table(rows, skipped)
    stats = summary(rows)
    print()
    print(f"configurations                {stats['configurations']}")
    print(f"median absolute error         {stats['median_abs_error'] * 100:.1f} %   (target <= 12 %)")
    print(f"worst absolute error          {stats['worst_abs_error'] * 100:.1f} %")
    print(f"Kendall's tau                 {stats['kendall_tau']:.2f}   (target >= 0.8)")
    between = repeatability(runs)
    if between:
        print(f"  measured vs measured        {statistics.median(between):.2f} median between two rounds "
              f"({min(between):.2f}-{max(between):.2f}): how far this machine repeats its own order")
    for family in families:
        mine = [row for row in rows if row.family == family]
        print(f"  within {family:20s} {kendall_tau([r.predicted_s for r in mine], [r.measured_s for r in mine]):.2f}")
    print(f"compute only (1 process)      median {stats['compute_only_median_abs_error'] * 100:.1f} %")
    print(f"with communication (2+ procs) median {stats['parallel_median_abs_error'] * 100:.1f} %")
    print(f"warmup 0 (PipeFusion)         median {stats['warmup0_median_abs_error'] * 100:.1f} % over "
          f"{stats['warmup0_configurations']} configurations")
    no_warmup = [row for row in rows if row.warmup == 0]
    if len(no_warmup) > 1:
        print(f"  Kendall's tau, warmup 0     {kendall_tau([r.predicted_s for r in no_warmup], [r.measured_s for r in no_warmup]):.2f}")
    components = component_errors(rows)
    for key, errors in components.items():
        if errors:
            print(f"per component: {key[:-2]:13s}  median {statistics.median(errors) * 100:.1f} % of the loop, worst "
                  f"{max(errors) * 100:.1f} % over {len(errors)} configurations (run.json per-rank totals)")
    if not any(components.values()):
        print("per component: run.json carries no per-rank compute/communication/waiting totals; compute is checked "
              "by the 1-process rows above (and --compute-split)")
    split = [abs(row.compute_error) for row in rows if math.isfinite(row.cpu_per_step_s)]
    if split:
        print(f"compute per step (CPU time)   median {statistics.median(split) * 100:.1f} %, worst {max(split) * 100:.1f} % "
              f"over {len(split)} configurations")
    stolen = statistics.median(row.stolen for row in rows)
    if stolen > STOLEN_NOTICE:
        print(f"note: the hypervisor took a median {stolen * 100:.0f} % of this machine's CPU time during the runs (steal); "
              "wall-clock times are inflated by it against a profile of the CPU's own rates: rerun when the host is quiet "
              "before judging the errors")
    print(f"profile {profile}; load average at end: {load_average()}; {time.time() - started:.0f} s in all")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"table written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
