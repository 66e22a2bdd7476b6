"""Run a VNN-COMP folder back: instances.csv → our ONNX loader + VNN-LIB reader → project verifiers.

Per instance the answer is `unsat`, `sat` (with a counterexample re-checked on the loaded network),
`timeout` or `unknown`:

- standard and hull instances (no Floor): an attack for `sat`, auto_LiRPA bounds (CROWN by default) on the
  box with the parsed output condition for `unsat`. Hull instances report `sat` only for witnesses at box
  corners, which are realisable abstract inputs (every pixel at the first or last reachable cell), so a
  hull `sat` is also a real counterexample of the deployed classifier. What bounds and attacks leave open on a
  piecewise-linear ReLU network goes to the exact MILP (`milp.py`, HiGHS, the rest of the instance's time):
  `unsat` when every disjunct is refuted with a margin, `sat` only with a witness re-checked on the network
  (for hull instances a box corner: an interior witness is searched again among the corners, and without one
  the answer stays `unknown`).
- deployed instances (Floor): `sat` from a corner search guided by the hull network, re-checked on the
  deployed ONNX; `unsat` by mapping back to the network N (`onnx/network.onnx`) and the abstraction named
  in benchmark.json: the project's `abscert-sound` verifier when it is registered, else CROWN on the hull
  box (its first, sound stage). Without that metadata the answer is `unknown` unless an attack succeeds.

Timeouts are checked between stages (a bound computation is not interrupted); an answer that arrives after
the instance's timeout is reported as `timeout`, as VNN-COMP does.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..abstraction import Abstraction, cell_index, cell_lower, region_phi
from ..errors import UserError
from ..owned import RESULTS, check_writable, prepare_folder, report_kept, write_marker
from ..rundir import write_csv
from ..trained import TrainedModel
from ..validate import check_inside, read_json_file
from .benchmark import FORMAT, IMAGES, METADATA, check_timeout
from .onnx_export import hull_network
from .onnx_loader import OnnxModule, load_onnx
from .vnnlib import VnnlibProperty, format_number, read_vnnlib, stored_path

RESULT_FIELDS = ["onnx_file", "vnnlib_file", "timeout_s", "result", "time_s", "method", "encoding", "index",
                 "label", "result_file"]


class Timeout(Exception):
    """The instance's time budget ran out."""


@dataclass
class Outcome:
    """One instance's answer; x and y are set for sat (flattened input and output)."""

    result: str
    method: str = ""
    x: np.ndarray | None = None
    y: np.ndarray | None = None


# ------------------------------------------------------------------------------------------ instances


def read_instances(folder: Path) -> list[tuple[str, str, float, int]]:
    """(onnx, vnnlib, timeout, line) per line of instances.csv; bad lines are a UserError (file, line)."""
    path = folder / "instances.csv"
    if not path.is_file():
        raise UserError(f"missing {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file (binary or not UTF-8)") from None
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise UserError(f"{path}: line {number}: expected onnx_file,vnnlib_file,timeout_seconds")
        onnx_rel, vnn_rel, timeout = fields
        timeout_s = check_timeout(timeout, f"{path}: line {number}")
        for rel in (onnx_rel, vnn_rel):
            check_inside(folder, rel, f"{path}: line {number}")
            if not stored_path(folder / rel).is_file():  # rel or rel.gz (VNN-COMP 2024 stores .gz)
                raise UserError(f"{path}: line {number}: missing file {folder / rel}")
        rows.append((onnx_rel, vnn_rel, timeout_s, number))
    if not rows:
        raise UserError(f"{path} lists no instances")
    return rows


# ------------------------------------------------------------------------------------------- searches


class Budget:
    """A deadline; `check()` raises Timeout once it has passed."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + seconds

    def check(self) -> None:
        """Raise Timeout once the deadline has passed."""
        if time.perf_counter() > self.deadline:
            raise Timeout()

    def elapsed(self) -> float:
        """Seconds since the instance started."""
        return time.perf_counter() - self.start


def _score(prop: VnnlibProperty, y: torch.Tensor) -> torch.Tensor:
    """max over disjuncts of min over rows of (b - A·y): >= 0 exactly when the output condition holds."""
    a, b, owner = prop.rows()
    if not len(b):
        return torch.zeros(y.shape[0])
    slack = torch.as_tensor(b, dtype=y.dtype) - y @ torch.as_tensor(a, dtype=y.dtype).t()
    per_disjunct = [slack[:, [i for i, o in enumerate(owner) if o == d]].min(dim=1).values
                    for d in range(len(prop.disjuncts))]
    return torch.stack(per_disjunct, dim=1).max(dim=1).values


def _witness(model: torch.nn.Module, prop: VnnlibProperty, x: torch.Tensor) -> Outcome | None:
    """sat Outcome if x (1×input) is in the box and the model's output satisfies the property, else None."""
    with torch.no_grad():
        y = model(x).reshape(-1)
    flat = x.detach().reshape(-1).numpy().astype(np.float64)
    if prop.input_inside(flat) and prop.output_holds(y.numpy()):
        return Outcome("sat", x=flat, y=y.numpy().astype(np.float64))
    return None


def box_attack(model: torch.nn.Module, prop: VnnlibProperty, shape: tuple[int, ...], budget: Budget,
               starts: list[torch.Tensor], steps: int, restarts: int, generator: torch.Generator) -> Outcome | None:
    """PGD (sign steps, projection on the box) on the property score, plus random points of the box."""
    lower = torch.as_tensor(prop.lower, dtype=torch.float32).reshape(shape)
    upper = torch.as_tensor(prop.upper, dtype=torch.float32).reshape(shape)
    inits = [s.reshape(shape).clamp(lower, upper) for s in starts] + [(lower + upper) / 2]
    inits += [lower + torch.rand(shape, generator=generator) * (upper - lower) for _ in range(restarts)]
    step = (upper - lower) / 8
    for start in inits:
        x = start.clone()
        for _ in range(steps + 1):
            budget.check()
            found = _witness(model, prop, x)
            if found is not None:
                return found
            x.requires_grad_(True)
            score = _score(prop, model(x).reshape(1, -1).to(torch.float64)).sum()
            (grad,) = torch.autograd.grad(score, x)
            if not torch.any(grad != 0):
                break
            x = torch.max(torch.min(x.detach() + step * grad.sign(), upper), lower)
    return None


def corner_attack(surrogate: Callable[[torch.Tensor], torch.Tensor], check: Callable[[torch.Tensor], Outcome | None],
                  prop_score: Callable[[torch.Tensor], torch.Tensor], pixels: int, budget: Budget, steps: int,
                  restarts: int, generator: torch.Generator) -> Outcome | None:
    """Search corner choices z ∈ {0,1}^pixels (0: first reachable cell, 1: last) by PGD on a relaxation."""
    inits = [torch.full((pixels,), 0.5), torch.zeros(pixels), torch.ones(pixels)]
    inits += [torch.rand(pixels, generator=generator) for _ in range(restarts)]
    tried: set[bytes] = set()
    for start in inits:
        z = start.clone()
        for _ in range(steps + 1):
            budget.check()
            corner = (z > 0.5).to(torch.float32)
            key = corner.numpy().tobytes()
            if key not in tried:
                tried.add(key)
                found = check(corner)
                if found is not None:
                    return found
            z.requires_grad_(True)
            score = prop_score(surrogate(z)).sum()
            (grad,) = torch.autograd.grad(score, z)
            if not torch.any(grad != 0):
                break
            z = (z.detach() + 0.25 * grad.sign()).clamp(0, 1)
    return None


# ----------------------------------------------------------------------------------------------- bounds


class Bounder:
    """auto_LiRPA bounds of the property rows over the box, one BoundedModule per network."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._bounded: dict[int, Any] = {}

    def rows_infeasible(self, model: torch.nn.Module, prop: VnnlibProperty, lower: torch.Tensor,
                        upper: torch.Tensor) -> bool:
        """True when every disjunct has a row whose lower bound exceeds its b (the property is unsat)."""
        from ..lirpa import LIRPA_METHODS, bounded_input, bounded_module

        a, b, owner = prop.rows()
        if not len(b):
            return False
        key = id(model)
        if key not in self._bounded:  # the model is kept alive with its BoundedModule, so ids stay unique
            self._bounded[key] = (model, bounded_module(model, lower))
        c = torch.as_tensor(a, dtype=torch.float32)[None]
        lb, _ = self._bounded[key][1].compute_bounds(x=(bounded_input(lower, upper),), C=c,
                                                  method=LIRPA_METHODS[self.method], bound_upper=False)
        exceeds = (lb.detach().reshape(-1).to(torch.float64) > torch.as_tensor(b)).tolist()
        return all(any(exceeds[i] for i, o in enumerate(owner) if o == d) for d in range(len(prop.disjuncts)))


# --------------------------------------------------------------------------------------------- solvers


class RunBack:
    """Solves the instances of one folder, caching loaded networks and bounded modules."""

    def __init__(self, folder: Path, bound_method: str, attack_steps: int, attack_restarts: int, seed: int,
                 use_sound_verifier: bool, complete: bool = True) -> None:
        self.folder = folder
        self.complete = complete  # the exact MILP (vnncomp/milp.py) after bounds and attacks leave `unknown`
        self._forms: dict[str, Any] = {}
        self.bounder = Bounder(bound_method)
        self.steps, self.restarts = attack_steps, attack_restarts
        self.generator = torch.Generator().manual_seed(seed)
        self.use_sound_verifier = use_sound_verifier
        self._models: dict[str, OnnxModule] = {}
        self._hulls: dict[str, torch.nn.Module] = {}
        self._sound: Any = None  # the abscert-sound verifier once built; False when it is not available
        self.meta, self.by_instance, self.images = self._read_metadata()
        self.abstraction = Abstraction(**self.meta["abstraction"]) if self.meta.get("abstraction") else None

    def _read_metadata(self):
        path = self.folder / METADATA
        if not path.exists():
            return {}, {}, None
        meta = read_json_file(path, None)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{path} is not an abscert-bench benchmark description")
        instances = meta.get("instances", [])
        if not isinstance(instances, list) or not all(isinstance(i, dict) and "onnx" in i and "vnnlib" in i
                                                      for i in instances):
            raise UserError(f"{path}: malformed instances list")
        by_instance = {(i["onnx"], i["vnnlib"]): i for i in instances}
        images = None
        if (self.folder / IMAGES).exists():
            try:
                with np.load(self.folder / IMAGES) as data:
                    images = {int(i): x for i, x in zip(data["index"], data["x"])}
            except Exception:
                raise UserError(f"corrupt {self.folder / IMAGES}") from None
        return meta, by_instance, images

    def exact(self, model: OnnxModule, prop: VnnlibProperty, budget: Budget, corners: bool = False) -> Outcome | None:
        """The MILP's answer on the loaded network with what is left of the budget; None when it does not apply
        (not a piecewise-linear ReLU graph, too large, switched off). `corners`: the instance is a hull one, so a
        witness must be a box corner (a realisable abstract input) to count as `sat`."""
        from .milp import decide, extract

        if not self.complete:
            return None
        key = str(model.path)
        if key not in self._forms:
            self._forms[key] = extract(model)
        form = self._forms[key]
        if form is None:
            return None
        left = budget.deadline - time.perf_counter()
        if left <= 0:
            raise Timeout()
        found = decide(form, prop, model, left)
        if found.result == "sat" and corners and found.x is not None:
            at_corner = np.all((found.x == prop.lower.astype(np.float32)) | (found.x == prop.upper.astype(np.float32)))
            if not at_corner:  # an interior point of the hull box: look for a corner witness instead
                left = budget.deadline - time.perf_counter()
                if left <= 0:
                    raise Timeout()
                found = decide(form, prop, model, left, binary_inputs=True)
                if found.result == "unsat":  # no corner violates: the hull network does only in between
                    return Outcome("unknown", "milp")
        if found.result == "unknown":
            return None
        if found.result == "sat" and found.x is not None:
            x = torch.from_numpy(found.x).reshape(1, *model.input_shape[1:])
            witness = _witness(model, prop, x)
            return Outcome("sat", "milp", witness.x, witness.y) if witness is not None else None
        return Outcome(found.result, "milp")

    def model(self, rel: str) -> OnnxModule:
        """The loaded ONNX network (cached)."""
        if rel not in self._models:
            self._models[rel] = load_onnx(self.folder / rel)
        return self._models[rel]

    def solve(self, onnx_rel: str, vnn_rel: str, timeout: float) -> tuple[Outcome, dict[str, Any], float]:
        """Answer one instance; returns (outcome, its metadata or {}, seconds)."""
        budget = Budget(timeout)
        model = self.model(onnx_rel)
        n_in, n_out = int(np.prod(model.input_shape)), int(np.prod(model.output_shape))
        prop = read_vnnlib(self.folder / vnn_rel, n_in, n_out)
        info = self.by_instance.get((onnx_rel, vnn_rel), {})
        encoding = info.get("encoding", "standard" if "Floor" not in model.op_types else "floor")
        try:
            if encoding == "hull" and self.abstraction is not None:
                outcome = self.solve_hull(model, prop, budget)
            elif encoding == "deployed" and self.abstraction is not None:
                outcome = self.solve_deployed(model, prop, info, budget)
            else:
                outcome = self.solve_box(model, prop, budget, info)
        except Timeout:
            outcome = Outcome("timeout")
        elapsed = budget.elapsed()
        if elapsed > timeout and outcome.result in ("sat", "unsat"):
            outcome = Outcome("timeout", outcome.method)
        return outcome, info, elapsed

    def _center(self, info: dict[str, Any]) -> list[torch.Tensor]:
        if self.images is None or "index" not in info or info["index"] not in self.images:
            return []
        return [torch.from_numpy(self.images[info["index"]])[None]]

    def solve_box(self, model: OnnxModule, prop: VnnlibProperty, budget: Budget, info: dict[str, Any]) -> Outcome:
        """Standard instance: center/PGD attack, then bounds on the box, then a longer attack."""
        shape = (1, *model.input_shape[1:])
        starts = self._center(info) if info.get("encoding") == "standard" else []
        found = box_attack(model, prop, shape, budget, starts, 0, 0, self.generator)
        if found is not None:
            return Outcome("sat", "center", found.x, found.y)
        lower = torch.as_tensor(prop.lower, dtype=torch.float32).reshape(shape)
        upper = torch.as_tensor(prop.upper, dtype=torch.float32).reshape(shape)
        if "Floor" not in model.op_types:
            budget.check()
            if self.bounder.rows_infeasible(model, prop, lower, upper):
                return Outcome("unsat", self.bounder.method)
        found = box_attack(model, prop, shape, budget, starts, self.steps, self.restarts, self.generator)
        if found is not None:
            return Outcome("sat", "pgd", found.x, found.y)
        return self.exact(model, prop, budget) or Outcome("unknown")

    def _pixel_to_input(self, z: torch.Tensor) -> torch.Tensor:
        """Per-pixel corner choice → per-input-variable choice of the hull network (region: both ends)."""
        assert self.abstraction is not None  # hull and deployed instances are solved only for AbsCert folders
        return z if self.abstraction.variant == "point" else torch.cat([z, z])

    def solve_hull(self, model: OnnxModule, prop: VnnlibProperty, budget: Budget) -> Outcome:
        """Hull instance: realisable-corner attack for sat, bounds on the box for unsat."""
        assert self.abstraction is not None  # solve() sends hull instances here only for AbsCert folders
        shape = (1, *model.input_shape[1:])
        lower = torch.as_tensor(prop.lower, dtype=torch.float32)
        upper = torch.as_tensor(prop.upper, dtype=torch.float32)
        pixels = lower.numel() if self.abstraction.variant == "point" else lower.numel() // 2

        def point(z):
            return (lower + self._pixel_to_input(z) * (upper - lower)).reshape(shape)

        def score(y):
            return _score(prop, y.reshape(1, -1).to(torch.float64))

        found = corner_attack(lambda z: model(point(z)), lambda z: _witness(model, prop, point(z)), score,
                              pixels, budget, 0, 0, self.generator)
        if found is not None:
            return Outcome("sat", "corner", found.x, found.y)
        budget.check()
        if self.bounder.rows_infeasible(model, prop, lower.reshape(shape), upper.reshape(shape)):
            return Outcome("unsat", self.bounder.method)
        found = corner_attack(lambda z: model(point(z)), lambda z: _witness(model, prop, point(z)), score,
                              pixels, budget, self.steps, self.restarts, self.generator)
        if found is not None:
            return Outcome("sat", "corner", found.x, found.y)
        return self.exact(model, prop, budget, corners=True) or Outcome("unknown")

    def _hull_of_ball(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hull box of the abstract inputs of the concrete box [lo, hi] (the clipped ball)."""
        ab = self.abstraction
        assert ab is not None  # hull and deployed instances are solved only for AbsCert folders
        if ab.variant == "point":
            return cell_lower(cell_index(lo, ab.d), ab.d), cell_lower(cell_index(hi, ab.d), ab.d)
        return region_phi(lo, ab.d, ab.eps), region_phi(hi, ab.d, ab.eps)

    def solve_deployed(self, model: OnnxModule, prop: VnnlibProperty, info: dict[str, Any],
                       budget: Budget) -> Outcome:
        """Deployed instance: corner search guided by the hull network, then the sound AbsCert check."""
        network_rel = self.meta.get("network_onnx")
        if not network_rel or not stored_path(self.folder / network_rel).is_file():
            return self.solve_box(model, prop, budget, info)
        network = self.model(network_rel)
        if network_rel not in self._hulls:
            assert self.abstraction is not None  # solve() sends deployed instances here only for AbsCert folders
            self._hulls[network_rel] = hull_network(self.abstraction, network)
        hull = self._hulls[network_rel]
        shape = (1, *model.input_shape[1:])
        lo = torch.as_tensor(prop.lower, dtype=torch.float32).reshape(shape)
        hi = torch.as_tensor(prop.upper, dtype=torch.float32).reshape(shape)
        hull_lo, hull_hi = self._hull_of_ball(lo, hi)
        hull_shape = hull_lo.shape

        def relaxed(z):
            return hull(hull_lo + self._pixel_to_input(z).reshape(hull_shape) * (hull_hi - hull_lo))

        def concrete(z):
            return lo + z.reshape(shape) * (hi - lo)

        def score(y):
            return _score(prop, y.reshape(1, -1).to(torch.float64))

        def check(z):
            return _witness(model, prop, concrete(z))

        found = corner_attack(relaxed, check, score, lo.numel(), budget, 0, 0, self.generator)
        if found is not None:
            return Outcome("sat", "corner", found.x, found.y)
        budget.check()
        outcome = self._sound_check(model, network, prop, info, budget)
        if outcome is None:
            if self.bounder.rows_infeasible(hull, prop, hull_lo, hull_hi):
                return Outcome("unsat", f"hull-{self.bounder.method}")
            outcome = Outcome("unknown")
        if outcome.result != "unknown":
            return outcome
        found = corner_attack(relaxed, check, score, lo.numel(), budget, self.steps, self.restarts, self.generator)
        if found is not None:
            return Outcome("sat", "corner", found.x, found.y)
        return outcome

    def _sound_check(self, model: OnnxModule, network: OnnxModule, prop: VnnlibProperty, info: dict[str, Any],
                     budget: Budget) -> Outcome | None:
        """abscert-sound on (N from network.onnx, abstraction, image, eps); None when it cannot be used."""
        if not self.use_sound_verifier or not self._center(info) or "label" not in info:
            return None
        from ..verification import create_verifier

        if self._sound is None:
            try:
                self._sound = create_verifier("abscert-sound")
            except (UserError, ImportError):
                self._sound = False
        if self._sound is False:
            return None
        verifier = self._sound
        if isinstance(getattr(verifier, "timeout", None), float):  # its own per-sample budget: what is left
            verifier.timeout = max(1e-3, budget.deadline - time.perf_counter())
        trained = TrainedModel(network, self.meta["model_config"], self.abstraction)
        x = self._center(info)[0]
        y = torch.tensor([int(info["label"])])
        result = verifier.verify(trained, x, y, float(self.meta["eps"]))[0]
        if result.status == "verified":
            return Outcome("unsat", "abscert-sound")
        if result.status == "falsified" and result.counterexample is not None:
            found = _witness(model, prop, torch.as_tensor(result.counterexample, dtype=torch.float32).reshape(x.shape))
            if found is not None:
                return Outcome("sat", "abscert-sound", found.x, found.y)
        return Outcome("unknown")


# ----------------------------------------------------------------------------------------- result files


def format_result(outcome: Outcome) -> str:
    """VNN-COMP result file text: `unsat`, `timeout`, `unknown`, or `sat` with ((X_i v) ... (Y_j v))."""
    if outcome.result != "sat":
        return outcome.result + "\n"
    assert outcome.x is not None and outcome.y is not None  # a sat outcome carries its witness
    pairs = [f"(X_{i} {format_number(v)})" for i, v in enumerate(outcome.x)]
    pairs += [f"(Y_{j} {format_number(v)})" for j, v in enumerate(outcome.y)]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def read_result(path: Path) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """Parse a result file back: (result, x, y) with x/y only for sat."""
    try:
        lines = Path(path).read_text().split(None, 1)
    except FileNotFoundError:
        raise UserError(f"missing result file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read result file {path}: {type(exc).__name__}") from None
    if not lines:
        raise UserError(f"empty result file {path}")
    result = lines[0].strip()
    if result != "sat":
        return result, None, None
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for token in lines[1].replace("(", " ").replace(")", " ").split("\n"):
        parts = token.split()
        for name, value in zip(parts[::2], parts[1::2]):
            kind, index = name.split("_")
            values[kind][int(index)] = float(value)
    return "sat", np.array([values["X"][i] for i in range(len(values["X"]))]), \
        np.array([values["Y"][j] for j in range(len(values["Y"]))])


def _is_own_csv(path: Path) -> bool:
    try:
        with path.open(newline="") as handle:
            return handle.readline().strip() == ",".join(RESULT_FIELDS)
    except (OSError, UnicodeDecodeError):
        return False


def run_benchmark(folder: Path, out_csv: Path | None = None, bound_method: str = "crown", attack_steps: int = 30,
                  attack_restarts: int = 2, seed: int = 0, use_sound_verifier: bool = True,
                  progress: Callable[[dict[str, Any]], None] | None = None, force: bool = True,
                  complete: bool = True) -> list[dict[str, Any]]:
    """Solve every instance of a folder (`complete`: with the exact MILP for piecewise-linear networks after the
    bounds and attacks, within each instance's timeout); write one VNN-COMP result file per instance (in the
    folder named like `out_csv` without its suffix) and the summary CSV `out_csv` (default FOLDER/results.csv).

    Existing results need `force`, and are replaced only when abscert-bench wrote them (the CSV by its header,
    the results folder by its marker, or, from earlier versions, by holding nothing but result files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"benchmark folder {folder} does not exist")
    instances = read_instances(folder)
    out_csv = Path(out_csv) if out_csv is not None else folder / "results.csv"
    results_dir = out_csv.with_suffix("")
    if results_dir == out_csv:
        results_dir = out_csv.with_name(out_csv.name + "_files")
    if out_csv.exists():
        if not _is_own_csv(out_csv):
            raise UserError(f"{out_csv} exists and is not a results CSV abscert-bench wrote, so even --force does "
                            "not replace it; choose another --out (nothing was changed)")
        if not force:
            raise UserError(f"{out_csv} exists; pass --force to overwrite it")
    check_writable(out_csv)
    prepare_folder(results_dir, RESULTS, force, option="results folder", remove=False)  # refused before any work
    solver = RunBack(folder, bound_method, attack_steps, attack_restarts, seed, use_sound_verifier, complete)
    # Load and parse everything first, so a bad file fails before any work.
    for onnx_rel, vnn_rel, _, _ in instances:
        model = solver.model(onnx_rel)
        read_vnnlib(folder / vnn_rel, int(np.prod(model.input_shape)), int(np.prod(model.output_shape)))
    kept = prepare_folder(results_dir, RESULTS, force, option="results folder")
    results_dir.mkdir(parents=True, exist_ok=True)
    write_marker(results_dir, RESULTS)
    report_kept(results_dir, kept)
    rows = []
    for onnx_rel, vnn_rel, timeout, _ in instances:
        outcome, info, elapsed = solver.solve(onnx_rel, vnn_rel, timeout)
        name = f"{Path(onnx_rel).stem}__{Path(vnn_rel).stem}.txt"
        tmp = results_dir / (name + ".tmp")
        tmp.write_text(format_result(outcome))
        tmp.replace(results_dir / name)
        write_marker(results_dir, RESULTS, [name])
        row = {"onnx_file": onnx_rel, "vnnlib_file": vnn_rel, "timeout_s": f"{timeout:g}", "result": outcome.result,
               "time_s": f"{elapsed:.4f}", "method": outcome.method, "encoding": info.get("encoding", ""),
               "index": info.get("index", ""), "label": info.get("label", ""),
               "result_file": os.path.relpath(results_dir / name, folder)}  # relative to the folder
        rows.append(row)
        if progress is not None:
            progress(row)
    write_csv(out_csv, rows, RESULT_FIELDS)
    return rows
