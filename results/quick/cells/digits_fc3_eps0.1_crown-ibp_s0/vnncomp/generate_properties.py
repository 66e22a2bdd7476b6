"""generate_properties.py of an exported benchmark folder (copied there by `abscert-bench export`).

Regenerates the folder's vnnlib/ and instances.csv (and instances-abcrown.csv), VNN-COMP's benchmark convention:

    python generate_properties.py SEED [--images POOL.npz]

Standalone: numpy and the folder's benchmark.json and images.npz only (no abscert_bench import). The seed picks
the benchmark's number of images from a pool (arrays index, label, x with raw [0, 1] N×C×H×W images) as
`abscert-bench export --seed` picks test images: sorted(default_rng(seed).choice(len(pool), samples,
replace=False)). The default pool is the folder's own images.npz, which holds exactly the exported images, so any
seed regenerates the exported files byte for byte; a pool of the whole test set in order (index = position)
picks what `export --seed SEED` would. When the chosen images differ from images.npz, images.npz and the
instances of benchmark.json are rewritten too (the run-back maps instances to images through them). The cell rule
is the project's: cell k of a value v is min(max(floor(v / d + 2^-16), 0), K - 1) in float64, K = ceil(1/d - 2^-16),
ends k·d and min((k + 1)·d, 1) rounded to float32. VNN-LIB 2.0 copies (vnnlib2/) are not regenerated.
"""
import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np

EDGE_TOLERANCE = 2.0 ** -16
FOLDER = Path(__file__).resolve().parent


def num_cells(d):
    return max(1, math.ceil(1.0 / d - EDGE_TOLERANCE))


def cell_index(values, d):
    return np.clip(np.floor(np.asarray(values, dtype=np.float64) / d + EDGE_TOLERANCE), 0, num_cells(d) - 1)


def cell_lower(index, d):
    return (np.asarray(index, dtype=np.float64) * d).astype(np.float32)


def cell_upper(index, d):
    return np.minimum((np.asarray(index, dtype=np.float64) + 1) * d, 1.0).astype(np.float32)


def ball(x, eps):
    """The L∞ ball around x clipped to [0, 1], in float32 as the export computes it."""
    eps32 = np.float32(eps)
    return np.clip(x - eps32, 0, 1).astype(np.float32), np.clip(x + eps32, 0, 1).astype(np.float32)


def region_phi(x, d, eps):
    lo, hi = ball(x, eps)
    return np.concatenate([cell_lower(cell_index(lo, d), d), cell_upper(cell_index(hi, d), d)], axis=0)


def box(encoding, x, eps, abstraction):
    """Input box (lower, upper) of one image (C×H×W) for an encoding."""
    lo, hi = ball(x, eps)
    if encoding != "hull":
        return lo, hi
    d = abstraction["d"]
    if abstraction["variant"] == "point":
        return cell_lower(cell_index(lo, d), d), cell_lower(cell_index(hi, d), d)
    return region_phi(lo, d, abstraction["eps"]), region_phi(hi, d, abstraction["eps"])


def number(value):
    """Shortest positional decimal that reads back as the same float64."""
    return np.format_float_positional(float(value), unique=True, trim="0")


def vnnlib_text(lower, upper, label, num_outputs, comment):
    lower, upper = lower.astype(np.float64).reshape(-1), upper.astype(np.float64).reshape(-1)
    lines = [f"; {line}" for line in comment.splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(lower.size)]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_outputs)]
    lines += ["", "; input box"]
    for i, (lo, hi) in enumerate(zip(lower, upper)):
        lines.append(f"(assert (<= X_{i} {number(hi)}))")
        lines.append(f"(assert (>= X_{i} {number(lo)}))")
    lines += ["", f"; violation: some class j != {label} reaches the logit of class {label}", "(assert (or"]
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_outputs) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def write(path, text, compressed):
    data = text.encode()
    if compressed:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("--images", type=Path, default=None, help="pool of images (npz: index, label, x)")
    args = parser.parse_args(argv)
    meta = json.loads((FOLDER / "benchmark.json").read_text())
    own = np.load(FOLDER / "images.npz")
    pool = np.load(args.images) if args.images else own
    samples, eps, timeout = len(own["index"]), meta["eps"], meta["timeout"]
    if samples > len(pool["index"]):
        sys.exit(f"the pool has {len(pool['index'])} images, the benchmark {samples}")
    chosen = sorted(int(i) for i in np.random.default_rng(args.seed).choice(len(pool["index"]), size=samples,
                                                                             replace=False))
    index, label, x = pool["index"][chosen], pool["label"][chosen], pool["x"][chosen].astype(np.float32)
    num_outputs = int(meta["num_outputs"])
    onnx_of = {}
    for instance in meta["instances"]:
        onnx_of.setdefault(instance["encoding"], instance["onnx"])
    compressed = bool(meta.get("gzip", False))
    lines, instances = [], []
    for encoding in meta["encodings"]:
        for position, (i, y, image) in enumerate(zip(index, label, x)):
            lower, upper = box(encoding, image, eps, meta["abstraction"])
            stem = f"{encoding}_img{int(i):05d}"
            comment = (f"abscert-bench {encoding} encoding: test image {int(i)}, label {int(y)}, eps {eps:g}\n"
                       f"unsat proves robustness; see README.md")
            vnn_rel = f"vnnlib/{stem}.vnnlib"
            write(FOLDER / vnn_rel, vnnlib_text(lower, upper, int(y), num_outputs, comment), compressed)
            lines.append(f"{onnx_of[encoding]},{vnn_rel},{timeout:g}")
            instances.append({"onnx": onnx_of[encoding], "vnnlib": vnn_rel, "vnnlib2": None, "timeout": timeout,
                              "encoding": encoding, "index": int(i), "label": int(y), "position": position})
    (FOLDER / "instances.csv").write_text("\n".join(lines) + "\n")
    if (FOLDER / "instances-abcrown.csv").exists():  # alpha-beta-CROWN's instances: every encoding but deployed
        readable = [line for line, inst in zip(lines, instances) if inst["encoding"] != "deployed"]
        (FOLDER / "instances-abcrown.csv").write_text("\n".join(readable) + "\n")
    if not (np.array_equal(index, own["index"]) and np.array_equal(x, own["x"])):
        np.savez_compressed(FOLDER / "images.npz", index=index, label=label, x=x)
        meta["instances"], meta["seed"] = instances, args.seed
        (FOLDER / "benchmark.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(lines)} instances to {FOLDER / 'instances.csv'}")


if __name__ == "__main__":
    main()
