"""Export a run directory as a VNN-COMP benchmark folder (onnx/, vnnlib/, instances.csv), with checks.

Layout of a folder:

    README.md            what the encodings mean and the command that regenerates the folder
    instances.csv        onnx_file,vnnlib_file,timeout_seconds (VNN-COMP; no header)
    onnx/*.onnx          one network per encoding (batch dimension 1)
    vnnlib/*.vnnlib      VNN-LIB 1.0, one property per (encoding, image)
    vnnlib2/*.vnnlib     VNN-LIB 2.0 copies (with --vnnlib2)
    benchmark.json       metadata: source run, abstraction, per-instance image index/label, check results
    images.npz           the exported test images (index, label, x), for the run-back's mapping to the run
    generate_properties.py  regenerates vnnlib/ and instances.csv from a seed (standalone: numpy only)
    .abscert-bench.json  the marker of a folder written by export (owned.py)

The folder is written into a temporary sibling and renamed into place, so a partial folder never looks
complete; an existing target needs `force` and must be a folder written by export (its `.abscert-bench.json`
marker, or the `benchmark.json` of an older version); only the tool's entries are replaced, other files are kept
(see owned.py). With `gzip`, onnx/ and vnnlib/ (vnnlib2/) hold `.onnx.gz` / `.vnnlib.gz` files while instances.csv
names the uncompressed paths, as the VNN-COMP 2024 benchmark repository does (`gunzip -r FOLDER` restores them;
`vnncomp run` reads either).
"""
from __future__ import annotations

import gzip as gzip_module
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..abstraction import Abstraction, ball, check_eps
from ..data import load_dataset
from ..errors import UserError
from ..owned import EXPORT, prepare_folder, report_kept, write_marker
from ..rundir import read_json, write_json
from ..trained import TrainedModel, check_input_shape, load_checkpoint
from .onnx_export import ExportableDeployed, check_export, export_form, export_onnx, hull_network
from .vnnlib import check_vnnlib2, format_vnnlib, format_vnnlib2, read_vnnlib, robustness_violation

FORMAT = "abscert-bench-vnncomp/1"
METADATA = "benchmark.json"
IMAGES = "images.npz"
RANDOM_POINTS = 4  # random points per box checked against onnxruntime, besides its two corners and the image

ENCODING_TEXT = {
    "standard": "the network as trained on raw images; input box = L∞ ball of radius eps around the image, "
                "clipped to [0,1]",
    "hull": "AbsCert, sound box encoding without Floor, a plain feed-forward graph (Conv / Gemm / Relu / Flatten, "
            "float32 constants; no Concat, Sub, Cast or Floor) that Marabou, onnx2pytorch and other tools read: for "
            "'point' the network input is the lower-end channels L and computes N([L, min(L + d, 1)]), for L >= 0; "
            "when d divides 1 the upper ends L + d are folded into N's first affine layer (W_lower + W_upper, bias + "
            "W_upper·d), otherwise a 1×1 Conv and a Relu give relu(L + d - 1) and the upper end is "
            "L + d - relu(L + d - 1); for 'region' it is the 2C-channel network N over both ends. The input box is the "
            "hull of the abstract inputs reachable from the clipped eps-ball (cells cell_index(lo)..cell_index(hi) → "
            "[cell_lower(first), cell_lower(last)] for 'point'; region_phi at the two ball corners for 'region'). "
            "Float semantics: a verifier that reasons in exact real arithmetic over the graph (Marabou, a MILP) and "
            "answers unsat proves, for every real L in the box, that N([L, min(L + d, 1)]) in real arithmetic ranks "
            "the label first; the deployed classifier evaluates N in float32 at the stored float32 ends "
            "(cell_upper(k) may differ from cell_lower(k) + d by one float32 ulp, ≤ 6e-8), so unsat proves the "
            "deployed classifier robust up to that rounding and N's own float32 evaluation error, as for every "
            "VNN-COMP benchmark. A sat witness is only a witness for the hull network (the run-back only reports sat "
            "for box corners, which are realisable)",
    "deployed": "AbsCert, exact encoding: the full deployed classifier f(x) = N(phi(x)) over the clipped L∞ ball, with "
                "the cell rule in float32 ops only (no Cast, no double constant): Unsqueeze, Sub of the float32 "
                "thresholds tau_m (the smallest float32 that cell_index puts in cell m), Floor, Add 1, Clip [0, 1] "
                "(= [x >= tau_m], exact), MatMul with a difference matrix + first-cell vector (one-hot cell), MatMul "
                "with the cell_lower / cell_upper tables (one nonzero term: exact), Concat; bit for bit "
                "abstraction.cell_index on every float32 input. unsat ⇔ the deployed classifier (in the verifier's "
                "arithmetic) is robust on the ball. It has Floor, so only tools that read Floor can use it: "
                "onnxruntime, onnx2pytorch / onnx2torch-based tools (α,β-CROWN as a forward model, for attacks), and "
                "our loader; Marabou cannot (Floor is not in its op list)",
}


def hull_box(x: torch.Tensor, abstraction: Abstraction, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hull box (lower, upper) of the abstract network inputs reachable from the clipped eps-ball around x: the
    lower ends for the point variant (the hull ONNX computes the upper ends), both ends for the region variant."""
    return abstraction.reachable_box(x, eps, "lower" if abstraction.variant == "point" else "ends")


def pick_images(num_test: int, samples: int, seed: int) -> list[int]:
    """`samples` distinct test indices chosen by `seed` (sorted)."""
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if samples > num_test:
        raise UserError(f"--samples {samples} exceeds the {num_test} test images")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_test, size=samples, replace=False))


def check_timeout(timeout: float | str, where: str = "--timeout") -> float:
    """A per-instance timeout must be a finite number > 0."""
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise UserError(f"{where}: timeout {timeout!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: timeout must be > 0 seconds, got {timeout}")
    return value


def regeneration_command(run_dir: Path, out: Path, samples: int, seed: int, timeout: float, vnnlib2: bool,
                         data_root: str | Path | None, gzip: bool = False) -> str:
    """The CLI line that rebuilds this folder."""
    prefix = f"ABSCERT_DATA={data_root} " if data_root else ""
    return (f"{prefix}abscert-bench export {run_dir} --out {out} --samples {samples} --seed {seed} "
            f"--timeout {timeout:g}" + (" --vnnlib2" if vnnlib2 else "") + (" --gzip" if gzip else "") + " --force")


GENERATOR = "generate_properties.py"
ABCROWN_CONFIG, ABCROWN_CSV = "abcrown.yaml", "instances-abcrown.csv"
# The encodings α,β-CROWN can bound (auto_LiRPA, which it is built on, has no Floor: the deployed encoding is left out).
ABCROWN_ENCODINGS = ("standard", "hull")


def abcrown_config(meta: dict[str, Any]) -> str:
    """α,β-CROWN's YAML configuration for an exported folder: its complete verifier (branch and bound) over the
    instances of the encodings it reads, listed in ABCROWN_CSV (same format as instances.csv)."""
    shape = [-1, *(int(v) for v in meta["onnx_input_shapes"].get("hull", meta["onnx_input_shapes"].get(
        "standard", [])))]
    return f"""# α,β-CROWN configuration for this folder (written by abscert-bench export). With α,β-CROWN installed
# (github.com/Verified-Intelligence/alpha-beta-CROWN), run from this folder:
#     python PATH/TO/alpha-beta-CROWN/complete_verifier/abcrown.py --config {ABCROWN_CONFIG}
# It verifies the instances of {ABCROWN_CSV}: the {' and '.join(e for e in ABCROWN_ENCODINGS if e in meta['encodings'])}
# encoding(s) (not `deployed`: it uses Floor, which auto_LiRPA cannot bound). Each instance keeps the timeout of its
# row ({meta['timeout']:g} s); `unsat` proves robustness, as for every verifier (see README.md).
general:
  root_path: .
  csv_name: {ABCROWN_CSV}
  complete_verifier: bab
model:
  input_shape: {shape}
solver:
  batch_size: 256
bab:
  timeout: {meta['timeout']:g}
attack:
  pgd_order: before
"""


def _compress(folder: Path) -> None:
    """Replace every onnx/*.onnx and vnnlib*/*.vnnlib by a reproducible .gz (mtime 0) of it."""
    for sub in ("onnx", "vnnlib", "vnnlib2"):
        if not (folder / sub).is_dir():
            continue
        for path in sorted((folder / sub).iterdir()):
            if path.suffix in (".onnx", ".vnnlib"):
                path.with_name(path.name + ".gz").write_bytes(gzip_module.compress(path.read_bytes(), mtime=0))
                path.unlink()


def _box_points(lower: torch.Tensor, upper: torch.Tensor, center: torch.Tensor, generator: torch.Generator):
    """The image (or its abstract point), both box corners and RANDOM_POINTS uniform points of the box."""
    rand = torch.rand((RANDOM_POINTS, *lower.shape), generator=generator)
    return torch.cat([center[None], lower[None], upper[None], lower + rand * (upper - lower)])


def _edge_images(input_shape: tuple[int, ...], abstraction: Abstraction) -> torch.Tensor:
    """Images whose pixels are all 256 8-bit levels and floats just around every cell edge."""
    n = int(np.prod(input_shape))
    edges = np.arange(0, 1.0 + abstraction.d, abstraction.d)
    near = np.concatenate([edges, np.nextafter(edges.astype(np.float32), np.float32(2)),
                           np.nextafter(edges.astype(np.float32), np.float32(-1))])
    values = np.clip(np.concatenate([np.arange(256) / 255.0, near]), 0, 1).astype(np.float32)
    count = math.ceil(len(values) / n)
    padded = np.resize(values, count * n)
    return torch.from_numpy(padded.reshape(count, *input_shape))


def _write_readme(folder: Path, meta: dict[str, Any]) -> None:
    chosen = f" chosen by seed {meta['seed']}" if meta["seed"] is not None else ""
    encodings = "\n".join(f"- `{name}`: {ENCODING_TEXT[name]}." for name in meta["encodings"])
    checks = meta["checks"]
    network_file = (" `onnx/network.onnx`: the AbsCert network N alone (2C channels), used by the run-back to map"
                    " deployed instances to the sound AbsCert check; not referenced by instances.csv."
                    if meta['abstraction'] else '')
    level_checks = (", and on images covering all 256 8-bit levels and floats next to every cell edge (deployed)"
                    if meta['abstraction'] else '')
    gz_note = ("\n- Compressed (`--gzip`): `onnx/*.onnx.gz`, `vnnlib/*.vnnlib.gz`; `instances.csv` names the "
               "uncompressed paths, as the VNN-COMP 2024 repository does. `gunzip -r .` restores them; "
               "`abscert-bench vnncomp run` reads either." if meta.get("gzip") else "")
    text = f"""# VNN-COMP benchmark exported by abscert-bench

Source run: `{meta['source_run']}` (dataset `{meta['dataset']}`, model `{meta['model_config']['model']}`,
method `{meta['method']}`{', abstraction ' + str(meta['abstraction']) if meta['abstraction'] else ''}).
Perturbation: L∞ radius eps = {meta['eps']:g} around each image, clipped to [0, 1].
Images: {meta['samples']} test images{chosen} (indices in `{METADATA}`).
Timeout per instance: {meta['timeout']:g} s.

Regenerate this folder with:

    {meta['command']}

## Encodings

{encodings}

Each property is the *violation* of robustness: the input box and a disjunction
`(or (and (>= Y_j Y_y)) ...)` over the classes j other than the label y. An `unsat` answer proves
robustness of the image; `sat` comes with a counterexample.

## Files

- `instances.csv`: `onnx_file,vnnlib_file,timeout_seconds` per line (no header).
- `onnx/`: ONNX opset 13, batch dimension 1; input flattened row-major into X_0 ... X_n.
- `vnnlib/`: VNN-LIB 1.0 properties.{' `vnnlib2/`: the same properties in VNN-LIB 2.0.' if meta['vnnlib2'] else ''}
- `{METADATA}`: metadata (source run, abstraction, image index and label per instance, checks).
- `{IMAGES}`: the exported images.{network_file}
- `{ABCROWN_CONFIG}` and `{ABCROWN_CSV}`: α,β-CROWN's configuration and the instances it can read (every
  encoding but `deployed`, whose Floor auto_LiRPA cannot bound): `python …/complete_verifier/abcrown.py --config
  {ABCROWN_CONFIG}` from this folder (not run here: α,β-CROWN is not installable from PyPI).
- `{GENERATOR}`: `python {GENERATOR} SEED [--images POOL.npz]` regenerates `vnnlib/`, `instances.csv` and
  `{ABCROWN_CSV}`
  (VNN-COMP's convention; numpy only). The seed picks {meta['samples']} images from the pool as `export --seed` picks
  test images; the default pool is `{IMAGES}`, so it reproduces this folder's files exactly.{gz_note}

## Checks done at export

- `onnx.checker` (full check) on every ONNX file;
- onnxruntime (and our own ONNX loader) equal torch within 1e-5 (+1e-5·|y|) on every exported image, both
  corners and {RANDOM_POINTS} random points of every box{level_checks};
- every VNN-LIB 1.0 file read back by our reader gives exactly the intended box and output condition;
- VNN-LIB 2.0: {checks['vnnlib2']}.

Run it back with `abscert-bench vnncomp run {meta['folder']}`.
"""
    (folder / "README.md").write_text(text)


def _prepare_target(out: Path, force: bool) -> list[str]:
    """Refuse a target that may not be replaced (owned.py's rule); returns the names in it that are not the tool's."""
    return prepare_folder(out, EXPORT, force, remove=False)


def _install(tmp: Path, out: Path, kept: list[str]) -> None:
    """Move the finished temp folder into place (replacing an old one only now), carrying over the `kept` entries
    of the old folder (those abscert-bench did not write)."""
    trash = None
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
    os.replace(tmp, out)
    if trash is not None:
        for name in kept:
            if (trash / name).exists() or (trash / name).is_symlink():
                os.rename(trash / name, out / name)
        shutil.rmtree(trash, ignore_errors=True)
    report_kept(out, kept)


def export_benchmark(run_dir: Path, out: Path, samples: int, seed: int, timeout: float, vnnlib2: bool = False,
                     force: bool = False, data_root: str | Path | None = None, gzip: bool = False) -> dict[str, Any]:
    """Export a run directory as a checked VNN-COMP folder at `out`; returns the folder's metadata."""
    run_dir, out = Path(run_dir), Path(out)
    check_timeout(timeout)
    _prepare_target(out, force)
    config = read_json(run_dir / "config.json")
    trained = load_checkpoint(run_dir)
    dataset = load_dataset(config["dataset"], data_root)
    check_input_shape(trained, dataset.input_shape, dataset.name)
    eps = check_eps(config["eps"])
    indices = pick_images(len(dataset.test_x), samples, seed)
    return write_benchmark(
        trained, dataset.test_x[indices], dataset.test_y[indices], indices, out, eps, timeout, vnnlib2, force,
        {"dataset": config["dataset"], "method": config.get("method"), "source_run": str(run_dir), "seed": seed,
         "samples": samples, "command": regeneration_command(run_dir, out, samples, seed, timeout, vnnlib2,
                                                              data_root, gzip)}, gzip)


def write_benchmark(trained: TrainedModel, images: torch.Tensor, labels: torch.Tensor, indices: list[int], out: Path,
                    eps: float, timeout: float, vnnlib2: bool = False, force: bool = False,
                    source: dict[str, Any] | None = None, gzip: bool = False) -> dict[str, Any]:
    """Export a model and images (raw [0,1], N×C×H×W) as a checked VNN-COMP folder at `out`, without a run directory.

    `source` describes where it came from for README.md / benchmark.json (keys dataset, method, source_run,
    seed, samples, command). Every check runs before the folder is moved into place; returns the metadata.
    """
    out = Path(out)
    timeout = check_timeout(timeout)
    eps = check_eps(eps)
    _prepare_target(out, force)
    source = {"dataset": "user data", "method": None, "source_run": "the Python API (abscert_bench.export_vnncomp)",
              "seed": None, "samples": len(images), "command": "(exported from Python; rerun the script that called "
              "abscert_bench.export_vnncomp)", **(source or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # the normal umask mode (tempfile.mkdtemp would make it 0700)
    try:
        meta = _export_into(tmp, trained, source, images, labels, list(indices), eps, timeout, vnnlib2)
        meta.update({**{k: source[k] for k in ("source_run", "seed", "samples", "command")}, "folder": str(out),
                     "gzip": bool(gzip)})
        shutil.copyfile(Path(__file__).with_name(GENERATOR), tmp / GENERATOR)
        if gzip:
            _compress(tmp)
        write_json(tmp / METADATA, meta)
        (tmp / ABCROWN_CONFIG).write_text(abcrown_config(meta))
        _write_readme(tmp, meta)
        write_marker(tmp, EXPORT, [p.name for p in tmp.iterdir()])
        kept = _prepare_target(out, force)
        _install(tmp, out, kept)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _export_into(folder: Path, trained: TrainedModel, config: dict[str, Any], images: torch.Tensor,
                 labels: torch.Tensor, indices: list[int], eps: float, timeout: float,
                 vnnlib2: bool) -> dict[str, Any]:
    """Write onnx/, vnnlib/ (vnnlib2/), instances.csv and images.npz into `folder`; return metadata."""
    (folder / "onnx").mkdir()
    (folder / "vnnlib").mkdir()
    if vnnlib2:
        (folder / "vnnlib2").mkdir()
    abstraction = trained.abstraction
    network = export_form(trained.network.eval())  # a fixed Normalize in N becomes the equivalent 1×1 Conv
    shape = tuple(trained.input_shape)
    generator = torch.Generator().manual_seed(0)
    checks: dict[str, Any] = {"onnx": {}, "vnnlib": "ok", "vnnlib2": "not exported"}
    # encoding → (onnx path, torch module, input shape, box function image → (lower, upper, abstract center))
    encodings: dict[str, tuple[str, torch.nn.Module, tuple[int, ...], Any]] = {}
    if abstraction is None:
        encodings["standard"] = ("onnx/model.onnx", network, shape, lambda x: (*ball(x, eps), x))
    else:
        hull = hull_network(abstraction, network, channels=shape[0])
        hull_shape = (shape[0] * (1 if abstraction.variant == "point" else 2), *shape[1:])

        def hull_fn(x):
            lower, upper = hull_box(x[None], abstraction, eps)
            center = hull_box(x[None], abstraction, 0.0)[0] if abstraction.variant == "point" \
                else abstraction(x[None])
            return lower[0], upper[0], center[0]
        encodings["hull"] = ("onnx/hull.onnx", hull, hull_shape, hull_fn)
        deployed = ExportableDeployed(abstraction, network).eval()
        encodings["deployed"] = ("onnx/deployed.onnx", deployed, shape, lambda x: (*ball(x, eps), x))
        export_onnx(network, (2 * shape[0], *shape[1:]), folder / "onnx" / "network.onnx")
        reference = trained.classifier().eval()
        with torch.no_grad():
            edge = _edge_images(shape, abstraction)
            if not torch.equal(deployed.abstract(edge), abstraction(edge)):
                raise UserError("exportable cell rule differs from abstraction.cell_index on edge values")
    instances: list[dict[str, Any]] = []
    csv_lines = []
    num_outputs = trained.num_classes
    for name, (onnx_rel, module, in_shape, box_fn) in encodings.items():
        export_onnx(module, in_shape, folder / onnx_rel)
        points = []
        for position, (x, y, index) in enumerate(zip(images, labels, indices)):
            lower, upper, center = box_fn(x)
            points.append(_box_points(lower, upper, center, generator))
            stem = f"{name}_img{index:05d}"
            comment = (f"abscert-bench {name} encoding: test image {index}, label {int(y)}, eps {eps:g}\n"
                       f"unsat proves robustness; see README.md")
            vnn_rel = f"vnnlib/{stem}.vnnlib"
            (folder / vnn_rel).write_text(format_vnnlib(lower.numpy(), upper.numpy(), int(y), num_outputs, comment))
            parsed = read_vnnlib(folder / vnn_rel, int(np.prod(in_shape)), num_outputs)
            if not parsed.same_as(lower.numpy(), upper.numpy(), robustness_violation(int(y), num_outputs)):
                raise UserError(f"{folder / vnn_rel}: read back, it differs from the intended property")
            vnn2_rel = None
            if vnnlib2:
                vnn2_rel = f"vnnlib2/{stem}.vnnlib"
                (folder / vnn2_rel).write_text(
                    format_vnnlib2(lower.numpy(), upper.numpy(), in_shape, int(y), num_outputs, comment))
                checks["vnnlib2"] = check_vnnlib2(folder / vnn2_rel, lower.numpy(), upper.numpy(), int(y),
                                                  num_outputs)
            csv_lines.append(f"{onnx_rel},{vnn_rel},{timeout:g}")
            instances.append({"onnx": onnx_rel, "vnnlib": vnn_rel, "vnnlib2": vnn2_rel, "timeout": timeout,
                              "encoding": name, "index": index, "label": int(y), "position": position})
        sample_points = torch.cat(points)
        if name == "deployed":
            assert abstraction is not None  # the deployed encoding exists only for AbsCert runs
            with torch.no_grad():
                if not torch.allclose(module(sample_points), reference(sample_points), atol=1e-6, rtol=1e-6):
                    raise UserError("exportable deployed classifier differs from the run's classifier")
            sample_points = torch.cat([sample_points, _edge_images(shape, abstraction)])
        checks["onnx"][onnx_rel] = check_export(folder / onnx_rel, module, sample_points.numpy())
    if abstraction is not None:
        net_points = torch.rand((4, 2 * shape[0], *shape[1:]), generator=generator)
        checks["onnx"]["onnx/network.onnx"] = check_export(folder / "onnx" / "network.onnx", network,
                                                           net_points.numpy())
    if vnnlib2 and checks["vnnlib2"] == "ok":
        checks["vnnlib2"] = "every file parsed by the vnnlib package; transform_to_compat gives the same box " \
                            "and output rows"
    elif not vnnlib2:
        checks["vnnlib2"] = "no VNN-LIB 2.0 files exported (use --vnnlib2)"
    (folder / "instances.csv").write_text("\n".join(csv_lines) + "\n")
    abcrown_lines = [line for line, instance in zip(csv_lines, instances) if instance["encoding"] in ABCROWN_ENCODINGS]
    (folder / ABCROWN_CSV).write_text("\n".join(abcrown_lines) + "\n")
    np.savez_compressed(folder / IMAGES, index=np.array(indices), label=labels.numpy(), x=images.numpy())
    return {
        "format": FORMAT, "dataset": config["dataset"], "method": config.get("method"), "eps": eps,
        "timeout": timeout, "vnnlib2": vnnlib2, "model_config": trained.model_config, "num_outputs": num_outputs,
        "abstraction": abstraction.to_dict() if abstraction else None, "encodings": list(encodings),
        "network_onnx": "onnx/network.onnx" if abstraction else None, "instances": instances, "checks": checks,
        "onnx_input_shapes": {name: list(spec[2]) for name, spec in encodings.items()},
    }
