"""`abscert-bench`: one verb per step. Errors in user input print one line and exit with status 2."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import validate as V
from .errors import UserError

DEFAULT_METHODS = ["natural", "abscert", "ibp", "crown-ibp"]
# alpha-CROWN is left out of the demo to keep it within minutes on 2 CPU cores; `compare` runs it by default.
DEMO_VERIFIERS = "abscert-paper,abscert-sound,ibp,crown,pgd"


def _bars_wanted(args: argparse.Namespace | None = None) -> bool:
    """Progress bars only on a terminal and without --quiet (logs get plain lines or nothing)."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _progress(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", leave=False, file=sys.stderr)


def _progress_factory(args: argparse.Namespace) -> Callable[[str, int], Any] | None:
    """Per-sample bars on a terminal; nothing in a log (verify prints one summary line per verifier)."""
    return _progress if _bars_wanted(args) else None


def _epoch_logger(label: str, epochs: int, args: argparse.Namespace | None = None) -> Callable[[dict[str, Any]], None]:
    """A bar per trained model on a terminal; one plain line per epoch on a non-terminal; nothing with --quiet."""
    if getattr(args, "quiet", False):
        return lambda row: None
    if not sys.stderr.isatty():
        count = [0]

        def log_epoch(row: dict[str, Any]) -> None:
            count[0] = count[0] % epochs + 1
            print(f"train {label}: epoch {count[0]}/{epochs}  loss {row['loss']:.3f}  acc {row['test_acc']:.3f}",
                  file=sys.stderr, flush=True)

        return log_epoch
    from tqdm import tqdm

    bars: list = []

    def on_epoch(row: dict[str, Any]) -> None:
        if not bars or bars[-1].n >= epochs:  # a new model (the granularity search trains several)
            if bars:
                bars[-1].close()
            bars.append(tqdm(total=epochs, desc=f"train {label}", unit="epoch", leave=False, file=sys.stderr))
        bars[-1].set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['test_acc']:.3f}")
        bars[-1].update(1)

    return on_epoch


def _floats(text: str, what: str = "") -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{what}expected comma-separated numbers, got {text!r}")
    return values


def _training_config() -> Any:
    """abscert_bench.training.config, torch-free: loaded from its file when the training package (whose
    __init__ registers the torch-backed methods) is not imported yet, so that parsing and argument errors never
    wait for torch. training/__init__.py binds this same module object as its `config` attribute."""
    import importlib
    import importlib.util

    name = "abscert_bench.training.config"
    if name in sys.modules or "abscert_bench.training" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("training") / "config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def add_training_args(p: argparse.ArgumentParser, single_method: bool) -> None:
    """Options shared by `train` and `demo`/`compare`; training defaults are TrainConfig's (training/config.py)."""
    training_config = _training_config()
    D, field_default = training_config.TRAIN_FIELD_DEFAULTS, training_config.field_default

    p.add_argument("--dataset", default="digits", help="dataset name (default: digits, embedded)")
    p.add_argument("--model", default="dm_small", help="architecture (fc3, fc5, dm_small, dm_medium, dm_large, "
                   "lenet5, cnn7, dm_small_bn, dm_medium_bn, resnet18, vgg11)")
    p.add_argument("--activation", default=D["activation"], help="relu, sigmoid or tanh (default: %(default)s)")
    if single_method:
        p.add_argument("--method", default="abscert", help="natural, abscert, ibp, crown-ibp, abscert-adv, "
                       "abscert-random, abscert-ibp, abscert-crown-ibp (or a plugin's)")
        p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a training method option (a TOML value: mix=0.8, attack_restarts=1, loss_fusion=true, "
                            "init=\"default\"; bare words are strings); repeatable. Spec files set them per method")
    else:
        p.add_argument("--methods", type=V.name_list, default=",".join(DEFAULT_METHODS),
                       help="comma-separated training methods (default: %(default)s)")
    p.add_argument("--eps", type=V.finite_float, default=0.1, help="L∞ radius in raw [0,1] pixel units")
    p.add_argument("--d", default=None, help="AbsCert granularity (default: abscert 0.2, abscert-adv / abscert-random "
                   "/ abscert-ibp 2·eps); a comma list runs the paper's "
                   "granularity search (protocol pixel only: official/clean choose d themselves)")
    p.add_argument("--protocol", default="pixel", help="AbsCert protocol: pixel (eps and d in raw-pixel units, as "
                   "given), official (the published code: paper units, 2 // d cells, [-1,1] normalisation, official "
                   "recipe, epoch and d selected on the test set) or clean (the same, selected on a validation split)")
    p.add_argument("--recipe", default=None, help="official (default for protocol official/clean: the recipe table "
                   "of abscert_bench/official.py) or given (use --epochs/--lr/--batch-size/--lr-schedule as given)")
    p.add_argument("--d-step", type=V.positive_float, default=None, help="official candidate spacing (default 0.01)")
    p.add_argument("--variant", default="point", help="AbsCert abstraction: point (official code) or region")
    p.add_argument("--epochs", type=V.positive_int, default=D["epochs"],
                   help="training epochs (with --budget-s only the schedules' proportions; default: %(default)s)")
    p.add_argument("--batch-size", type=V.positive_int, default=D["batch_size"],
                   help="training mini-batch size (default: %(default)s)")
    p.add_argument("--lr", type=V.positive_float, default=D["lr"],
                   help="Adam learning rate, the peak of --lr-schedule (default: %(default)s)")
    p.add_argument("--grad-norm", type=V.nonneg_float, default=D["grad_norm"],
                   help="clip the gradient's L2 norm to this before each step (0 = off; IBP training of large nets "
                        "usually wants ~10; default: %(default)s)")
    p.add_argument("--warmup-epochs", type=V.nonneg_int, default=D["warmup_epochs"],
                   help="IBP/CROWN-IBP epochs at eps = 0 (default: %(default)s)")
    p.add_argument("--ramp-epochs", type=V.nonneg_int, default=D["ramp_epochs"],
                   help="IBP/CROWN-IBP epochs of linear eps ramp-up (default: %(default)s)")
    p.add_argument("--kappa-end", type=V.unit_float, default=D["kappa_end"], help="final weight of the clean loss "
                   "(IBP/CROWN-IBP with method option loss_mix = kappa; the default loss_mix = robust ignores it; "
                   "default: %(default)s)")
    p.add_argument("--lr-schedule", default=D["lr_schedule"], help="constant, step (× --lr-decay after each of "
                   "--lr-milestones) or cosine (to 0 over the epochs; default: %(default)s)")
    p.add_argument("--lr-milestones", default=",".join(str(m) for m in D["lr_milestones"]),
                   help="comma-separated epochs for --lr-schedule step")
    p.add_argument("--lr-decay", type=V.positive_float, default=D["lr_decay"],
                   help="factor per milestone of --lr-schedule step (default: %(default)s)")
    p.add_argument("--lr-warmup-epochs", type=V.nonneg_float, default=D["lr_warmup_epochs"],
                   help="linear lr warm-up from 0, in epochs (default: %(default)s)")
    p.add_argument("--budget-s", type=V.nonneg_float, default=D["budget_s"],
                   help="train for this many seconds of training time instead of --epochs (the schedules are "
                        "stretched over the budget; --epochs sets only their proportions; default: %(default)s)")
    p.add_argument("--seed", type=V.nonneg_int, default=field_default("seed"),
                   help="seed of weight initialisation and data order (default: %(default)s)")
    p.add_argument("--device", type=V.device, default=D["device"], help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--data-root", type=V.directory_arg, default=None,
                   help="data directory (default: $ABSCERT_DATA or ./data)")
    p.add_argument("--force", action="store_true", help="overwrite existing run directories / results")


def base_config(args: argparse.Namespace, method: str):
    """TrainConfig from parsed arguments."""
    from .training.config import TRAIN_FIELD_DEFAULTS, config_from_settings

    settings = {name: getattr(args, name) for name in TRAIN_FIELD_DEFAULTS if hasattr(args, name)}
    milestones = _floats(args.lr_milestones, "--lr-milestones: ") if args.lr_milestones else []
    if any(m != int(m) for m in milestones):
        raise UserError(f"--lr-milestones: expected whole epochs, got {args.lr_milestones!r}")
    settings["lr_milestones"] = [int(m) for m in milestones]
    return config_from_settings(settings, dataset=args.dataset, model=args.model, method=method, eps=args.eps,
                                seed=args.seed)


def abscert_options(args: argparse.Namespace) -> dict[str, Any]:
    """AbsCert method options from --d / --variant / --protocol / --recipe / --d-step."""
    protocol = getattr(args, "protocol", "pixel")
    if protocol != "pixel":
        if args.d is not None:
            raise UserError(f"--protocol {protocol} chooses d itself from the official candidates; drop --d")
        options: dict[str, Any] = {"variant": args.variant, "protocol": protocol}
        if args.recipe is not None:
            options["recipe"] = args.recipe
        if args.d_step is not None:
            options["d_step"] = args.d_step
        return options
    if args.recipe is not None or args.d_step is not None:
        raise UserError("--recipe and --d-step belong to --protocol official or clean")
    if args.d is None:  # each method's own default (abscert 0.2; abscert-adv / -random / -ibp: 2·eps)
        return {"variant": args.variant}
    grid = _floats(args.d, "--d: ")
    return {"d": grid if len(grid) > 1 else grid[0], "variant": args.variant}


def method_option_values(items: list[str]) -> dict[str, Any]:
    """--method-option KEY=VALUE items → {key: TOML value} (bare words are strings)."""
    import tomllib

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise UserError(f"--method-option: expected KEY=VALUE, got {item!r}")
        try:
            options[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = text.strip()
    return options


def cmd_train(args: argparse.Namespace) -> int:
    V.check_dir_target(Path(args.out), "--out")
    from .data import load_dataset
    from .models import MODELS
    from .rundir import create_run_dir, discard_run_dir, finish_run_dir
    from .training.loop import resolve_device, run_training
    from .training.methods import accepted_options

    MODELS.get(args.model)
    config = base_config(args, args.method)
    config.method_options = {**accepted_options(args.method, abscert_options(args)),
                             **method_option_values(args.method_option)}
    config.validate()
    from .training.methods import create_method

    create_method(args.method, config.eps, **{k: (v[0] if k == "d" and isinstance(v, list) else v)
                                               for k, v in config.method_options.items()})  # options checked now
    resolve_device(args.device)
    dataset = load_dataset(args.dataset, args.data_root)
    run_dir = create_run_dir(Path(args.out), force=args.force)
    try:
        run_training(config, dataset, run_dir, on_epoch=_epoch_logger(args.method, args.epochs, args))
        finish_run_dir(run_dir)
    except BaseException:
        discard_run_dir(run_dir)  # never leave a half-written run looking usable (a user's files in it stay)
        raise
    print(f"trained {args.method} {args.model} on {args.dataset}: {run_dir}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    V.read_run_config(Path(args.run))
    from .training.loop import resolve_device
    from .verification.run import verify_run

    resolve_device(args.device)
    summaries = verify_run(
        Path(args.run), verifiers=args.verifiers, eps=args.eps, limit=args.limit, cascade=args.cascade,
        batch_size=args.batch_size, device=args.device, force=args.force, data_root=args.data_root,
        progress_factory=_progress_factory(args), timeout=args.timeout, memory_mb=args.memory_mb,
    )
    for s in summaries:
        print(f"{s['verifier']:>14}: verified {s['verified']}/{s['samples']}  falsified {s['falsified']}  "
              f"unknown {s['unknown']}  ({1000 * s['time_mean_s']:.1f} ms/sample)  [{s['meaning']}]")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    if args.csv:
        V.check_file_target(Path(args.csv), "--csv")
    from .harness.tables import collect, runs_markdown, write_rows_csv

    if args.sound_stages:
        from .sound_report import sound_report

        dirs = sorted({p.parent for root in args.runs for p in Path(root).rglob("abscert-sound.csv")})
        if not dirs:
            raise UserError(f"no abscert-sound results under {', '.join(args.runs)}")
        print(sound_report(dirs), end="")
        return 0
    rows = collect([Path(p) for p in args.runs])
    print(runs_markdown(rows), end="")
    if args.csv:
        write_rows_csv(Path(args.csv), rows)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    V.check_dir_target(Path(args.out), "--out")
    methods = args.methods
    base = base_config(args, methods[0])
    from .training.loop import resolve_device
    from .training.methods import accepted_options

    options = {m: accepted_options(m, abscert_options(args)) for m in methods}
    for method in methods:
        config = base_config(args, method)
        config.method_options = options[method]
        config.validate()
    resolve_device(args.device)
    table = compare(base, methods, options, Path(args.out), verify_limit=args.limit, force=args.force,
                    data_root=args.data_root, verifiers=args.verifiers, progress=_bars_wanted(args))
    print(table, end="")
    print(f"\nresults store (run directories under cells/*/run, logs/) and table.md / table.csv in {args.out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import dataset_names, load_dataset, resolve_root
    from .data.prepare import prepare

    if args.data_command == "prepare":
        for line in prepare(resolve_root(args.data_root), force=args.force):
            print(line)
    else:
        for name in dataset_names():
            try:
                ds = load_dataset(name, args.data_root)
                print(f"{name:>14}: {len(ds.train_x)} train / {len(ds.test_x)} test, shape {ds.input_shape}")
            except UserError as exc:
                print(f"{name:>14}: not available ({exc})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .abstraction import check_eps
    from .speed import speed_benchmark
    from .training.loop import resolve_device

    check_eps(args.eps)
    resolve_device(args.device)
    print(speed_benchmark(args.dataset, args.model, args.eps, args.epochs, args.batch_size, args.device,
                          args.data_root, args.limit_train, args.methods), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    V.read_run_config(Path(args.run))
    V.check_dir_target(Path(args.out), "--out")
    from .vnncomp import export_benchmark

    meta = export_benchmark(Path(args.run), Path(args.out), samples=args.samples, seed=args.seed,
                            timeout=args.timeout, vnnlib2=args.vnnlib2, force=args.force, data_root=args.data_root,
                            gzip=args.gzip)
    print(f"exported {len(meta.get('instances', []))} instances to {args.out}")
    return 0


def cmd_vnncomp_run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    V.check_input_dir(folder, "benchmark folder")
    from .lirpa import LIRPA_METHODS
    from .vnncomp import run_benchmark

    if args.bound_method not in LIRPA_METHODS:
        raise UserError(f"unknown --bound-method {args.bound_method!r}; valid: {', '.join(LIRPA_METHODS)}")
    out_csv = Path(args.out) if args.out else folder / "results.csv"
    V.check_file_target(out_csv, "--out")
    rows = run_benchmark(folder, out_csv, bound_method=args.bound_method, force=args.force,
                         complete=not args.no_milp)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    print(f"{len(rows)} instances: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"  → {out_csv}")
    return 0


def cmd_recheck(args: argparse.Namespace) -> int:
    from .sound.recheck import recheck_file

    report = recheck_file(Path(args.checkpoint), Path(args.counterexamples))
    for row in report:
        print(f"sample {row['index']} (label {row['label']}): {'ok' if row['ok'] else 'FAILED'} — {row['message']}")
    failures = sum(not row["ok"] for row in report)
    print(f"{len(report) - failures}/{len(report)} counterexamples re-check")
    if failures:
        raise UserError(f"{failures} counterexample(s) in {args.counterexamples} do not re-check")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one subcommand per verb."""
    parser = V.OneLineParser(prog="abscert-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model into a run directory")
    add_training_args(p, single_method=True)
    p.add_argument("--out", required=True, help="run directory to create")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("verify", help="verify a run's model on its test split")
    p.add_argument("run", help="run directory")
    p.add_argument("--verifiers", type=V.name_list, default=None,
                   help="comma list (default: every applicable verifier)")
    p.add_argument("--cascade", action="store_true", help="run the verifiers as a cascade, cheap first")
    p.add_argument("--eps", type=V.finite_float, default=None, help="default: the run's training eps")
    p.add_argument("--limit", type=V.positive_int, default=None,
                   help="verify only the first N test samples (N >= 1; results go to RUN/verify/eps=E,first=N/)")
    p.add_argument("--timeout", type=V.positive_float, default=None,
                   help="per-sample time limit (s) for verifiers that take one (abscert-sound; default 10)")
    p.add_argument("--memory-mb", type=V.positive_float, default=None,
                   help="memory budget of one bound call (MiB) for abscert-sound, crown, alpha-crown, ibp "
                        "(default 4096): batch sizes are planned from it, a sample that does not fit is unknown")
    p.add_argument("--batch-size", type=V.positive_int, default=64,
                   help="samples per verifier batch (default: %(default)s)")
    p.add_argument("--device", type=V.device, default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--data-root", type=V.directory_arg, default=None,
                   help="data directory (default: $ABSCERT_DATA or ./data)")
    p.add_argument("--force", action="store_true", help="overwrite existing results")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("table", help="print a Markdown comparison table from run directories")
    p.add_argument("runs", nargs="+", help="run directories or folders containing them")
    p.add_argument("--csv", default=None, help="also write the rows as CSV to this file")
    p.add_argument("--sound-stages", action="store_true",
                   help="instead: abscert-sound evidence (paper vs sound counts, per-stage time percentiles)")
    p.set_defaults(func=cmd_table)

    TRAIN_FIELD_DEFAULTS = _training_config().TRAIN_FIELD_DEFAULTS
    for name, out, limit, epochs, verifiers, help_text in (
        ("compare", None, None, TRAIN_FIELD_DEFAULTS["epochs"], None,
         "train every method on the same data/model/eps, verify all, print the table"),
        ("demo", "runs/demo", 200, 30, DEMO_VERIFIERS,
         "compare on the embedded digits (DM_Small, eps 0.1) in a few minutes"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_training_args(p, single_method=False)
        p.set_defaults(epochs=epochs, ramp_epochs=max(1, epochs // 3))
        p.add_argument("--out", default=out, required=out is None, help="folder for the run directories")
        p.add_argument("--limit", type=V.positive_int, default=limit, help="verify only the first N test samples")
        p.add_argument("--verifiers", type=V.name_list, default=verifiers,
                       help=f"comma list (default: {verifiers or 'every applicable verifier'})")
        p.set_defaults(func=cmd_compare)

    p = sub.add_parser("data", help="prepare or list datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="fill the data root from what this environment can reach")
    q.add_argument("--data-root", "--root", dest="data_root", type=V.directory_arg, default=None,
                   help="data directory to fill (default: $ABSCERT_DATA or ./data; --root is an alias)")
    q.add_argument("--force", action="store_true", help="rebuild datasets whose files are already present")
    q = data_sub.add_parser("list", help="list datasets and whether their files are present")
    q.add_argument("--data-root", "--root", dest="data_root", type=V.directory_arg, default=None,
                   help="data directory (default: $ABSCERT_DATA or ./data; --root is an alias)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("recheck", help="re-check saved counterexamples independently of the verifier")
    p.add_argument("checkpoint", help="checkpoint.pt or run directory")
    p.add_argument("counterexamples", help="<verifier>.counterexamples.npz written by verify")
    p.set_defaults(func=cmd_recheck)

    p = sub.add_parser("export", help="export a run as a VNN-COMP benchmark folder (onnx/, vnnlib/, instances.csv)")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="benchmark folder to create")
    p.add_argument("--samples", type=V.positive_int, default=5, help="number of test images")
    p.add_argument("--seed", type=V.nonneg_int, default=0, help="seed that picks the test images")
    p.add_argument("--timeout", type=V.positive_float, default=60.0, help="per-instance timeout (s) in instances.csv")
    p.add_argument("--vnnlib2", action="store_true", help="also write VNN-LIB 2.0 copies")
    p.add_argument("--gzip", action="store_true",
                   help="store onnx/*.onnx.gz and vnnlib/*.vnnlib.gz (instances.csv names the uncompressed paths, as "
                        "the VNN-COMP 2024 repository does; vnncomp run reads them)")
    p.add_argument("--data-root", type=V.directory_arg, default=None,
                   help="data directory (default: $ABSCERT_DATA or ./data)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("vnncomp", help="VNN-COMP benchmark folders")
    vnn_sub = p.add_subparsers(dest="vnncomp_command", required=True)
    q = vnn_sub.add_parser("run", help="verify every instance of a folder; VNN-COMP result files + summary CSV")
    q.add_argument("folder")
    q.add_argument("--out", default=None, help="summary CSV (default FOLDER/results.csv)")
    q.add_argument("--bound-method", default="crown",
                   help="auto_LiRPA method for hull/standard instances: ibp, crown-ibp, crown or alpha-crown "
                        "(default: %(default)s)")
    q.add_argument("--force", action="store_true", help="overwrite existing results")
    q.add_argument("--no-milp", action="store_true", help="skip the exact MILP (HiGHS) that standard and hull "
                   "instances of piecewise-linear ReLU networks get when bounds and attacks leave them undecided")
    q.set_defaults(func=cmd_vnncomp_run)

    p = sub.add_parser("bench", help="per-epoch training time ratios against natural training, one run")
    p.add_argument("--dataset", default="digits", help="dataset name (default: %(default)s)")
    p.add_argument("--model", default="dm_small", help="architecture (default: %(default)s)")
    p.add_argument("--eps", type=V.finite_float, default=0.1,
                   help="L∞ radius of the certified methods, raw pixel units (default: %(default)s)")
    p.add_argument("--epochs", type=V.positive_int, default=3,
                   help="timed epochs per method (default: %(default)s)")
    p.add_argument("--batch-size", type=V.positive_int, default=TRAIN_FIELD_DEFAULTS["batch_size"],
                   help="training mini-batch size (default: %(default)s)")
    p.add_argument("--limit-train", type=V.positive_int, default=None,
                   help="use the first N training images (default: all)")
    p.add_argument("--device", type=V.device, default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--data-root", type=V.directory_arg, default=None,
                   help="data directory (default: $ABSCERT_DATA or ./data)")
    p.add_argument("--methods", type=V.name_list, default=None, help="comma-separated subset of natural, abscert, "
                   "ibp, crown-ibp (loss fusion, its default), crown-ibp-unfused (default: all)")
    p.set_defaults(func=cmd_bench)

    from .harness.cli import add_run_parser

    add_run_parser(sub)  # `run SPEC` and `run-table`
    for verb_parser in _all_parsers(parser):
        if not any("--quiet" in action.option_strings for action in verb_parser._actions):
            verb_parser.add_argument("--quiet", action="store_true",
                                     help="no progress bars or per-epoch lines (errors and results still print)")
    return parser


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every leaf (sub)parser, i.e. every verb (data prepare, vnncomp run, … counted separately)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for action in subs for child in dict.fromkeys(action.choices.values()) for leaf in _all_parsers(child)]


# Third-party warnings that a normal run triggers and the user can do nothing about (filtered by message only).
KNOWN_WARNINGS = [
    (DeprecationWarning, r"`torch\.jit\.script` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.trace` is deprecated"),
    (UserWarning, r".*[Uu]nsqueeze.*negative ax"),
    (UserWarning, r"Converting a tensor with requires_grad=True to a Python"),
    (UserWarning, r"Converting a tensor to a Python"),
    (UserWarning, r"The given NumPy array is not writable"),
]


def _filter_known_warnings() -> None:
    import warnings

    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _close_bars() -> None:
    """Close open tqdm bars so an error line starts on a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", [])):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - closing is best effort; the error line matters more
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the verb; UserError → one line on stderr, exit 2."""
    import warnings

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help exits 0 as argparse does; an argument error has printed its line
        if exc.code == 2:
            return 2
        raise
    if extra:
        verb = " ".join(str(getattr(args, k)) for k in ("command", "data_command", "vnncomp_command")
                        if getattr(args, k, None))
        print(f"abscert-bench: error: {verb}: unrecognized arguments: {' '.join(extra)} "
              f"(see abscert-bench {verb} --help)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        _filter_known_warnings()
        try:
            return args.func(args)
        except UserError as exc:
            _close_bars()
            print(f"abscert-bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            _close_bars()
            print("abscert-bench: interrupted", file=sys.stderr)
            return 130
        except OSError as exc:  # a read-only filesystem, an unwritable folder, a full disk: one line, exit 2
            from .owned import os_error_line

            line = os_error_line(exc)
            if line is None:
                raise
            _close_bars()
            print(f"abscert-bench: error: {line}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
