"""VNN-LIB properties: writer and reader for 1.0 (VNN-COMP form), writer for 2.0, and the 2.0 check.

A property is the *violation*: an input box and an output condition given as a disjunction of conjunctions
of linear constraints `A·y <= b`. A verifier that shows it unsatisfiable proves robustness.

Numbers are written in positional notation (no exponent; VNN-LIB 2.0 has none) with the shortest digits
that read back to the same float64, so the box read back equals the intended float32 box exactly.
"""
from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..margins import margin_rows

Disjunct = tuple[np.ndarray, np.ndarray]  # (A: m×K, b: m): satisfied when A·y <= b
MAX_DISJUNCTS = 10_000


def stored_path(path: str | Path) -> Path:
    """Where a benchmark file is stored: `path` itself, or `path`.gz when only the gzip-compressed copy exists
    (VNN-COMP 2024 repositories store onnx/*.onnx.gz and vnnlib/*.vnnlib.gz and list the uncompressed names)."""
    path = Path(path)
    compressed = path.with_name(path.name + ".gz")
    return compressed if not path.exists() and compressed.is_file() else path


def read_stored(path: str | Path) -> bytes:
    """The bytes of a benchmark file (see `stored_path`), decompressed when it ends in .gz."""
    stored = stored_path(path)
    data = stored.read_bytes()
    return gzip.decompress(data) if stored.suffix == ".gz" else data


def format_number(value: float) -> str:
    """Shortest positional decimal that reads back as the same float64."""
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"cannot write non-finite bound {value} to VNN-LIB")
    return np.format_float_positional(value, unique=True, trim="0")


def robustness_violation(label: int, num_outputs: int) -> list[Disjunct]:
    """'Some class j != label reaches the logit of label': one disjunct Y_label - Y_j <= 0 per j."""
    return [(row[None], np.zeros(1)) for row in margin_rows(label, num_outputs)]


@dataclass
class VnnlibProperty:
    """An input box (float64, flattened row-major) and a disjunctive output condition."""

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: list[Disjunct] = field(default_factory=list)
    num_outputs: int = 0

    @property
    def num_inputs(self) -> int:
        """Number of input variables X_i."""
        return int(self.lower.size)

    def rows(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """All constraint rows stacked (A, b) and, per row, the index of its disjunct."""
        if not self.disjuncts:
            return np.zeros((0, self.num_outputs)), np.zeros(0), []
        a = np.concatenate([d[0] for d in self.disjuncts])
        b = np.concatenate([d[1] for d in self.disjuncts])
        owner = [i for i, d in enumerate(self.disjuncts) for _ in range(len(d[1]))]
        return a, b, owner

    def output_holds(self, y: np.ndarray) -> bool:
        """Whether outputs y satisfy the output condition (some disjunct has every row A·y <= b)."""
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if not self.disjuncts:
            return True
        return any(bool(np.all(a @ y <= b)) for a, b in self.disjuncts)

    def input_inside(self, x: np.ndarray) -> bool:
        """Whether x lies in the input box."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return x.shape == self.lower.shape and bool(np.all(x >= self.lower) and np.all(x <= self.upper))

    def same_as(self, lower: np.ndarray, upper: np.ndarray, disjuncts: list[Disjunct]) -> bool:
        """Exact equality with an intended box and output condition."""
        lower = np.asarray(lower, dtype=np.float64).reshape(-1)
        upper = np.asarray(upper, dtype=np.float64).reshape(-1)
        if lower.shape != self.lower.shape or not (np.array_equal(lower, self.lower)
                                                    and np.array_equal(upper, self.upper)):
            return False
        if len(disjuncts) != len(self.disjuncts):
            return False
        return all(np.array_equal(a1, a2) and np.array_equal(b1, b2)
                   for (a1, b1), (a2, b2) in zip(disjuncts, self.disjuncts))


# ----------------------------------------------------------------------------------------------- writers


def format_vnnlib(lower: np.ndarray, upper: np.ndarray, label: int, num_outputs: int, comment: str = "") -> str:
    """VNN-LIB 1.0 text: X_i/Y_j declarations, the input box, and the violation as `(or (and ...) ...)`."""
    lower = np.asarray(lower, dtype=np.float64).reshape(-1)
    upper = np.asarray(upper, dtype=np.float64).reshape(-1)
    lines = [f"; {line}" for line in comment.splitlines()] if comment else []
    lines += [f"(declare-const X_{i} Real)" for i in range(lower.size)]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_outputs)]
    lines += ["", "; input box"]
    for i, (lo, hi) in enumerate(zip(lower, upper)):
        lines.append(f"(assert (<= X_{i} {format_number(hi)}))")
        lines.append(f"(assert (>= X_{i} {format_number(lo)}))")
    lines += ["", f"; violation: some class j != {label} reaches the logit of class {label}", "(assert (or"]
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_outputs) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def format_vnnlib2(lower: np.ndarray, upper: np.ndarray, input_shape: tuple[int, ...], label: int,
                   num_outputs: int, comment: str = "") -> str:
    """VNN-LIB 2.0 text of the same property, with tensor-indexed X[0,c,h,w] and Y[0,j]."""
    lower = np.asarray(lower, dtype=np.float64).reshape(-1)
    upper = np.asarray(upper, dtype=np.float64).reshape(-1)
    shape = (1, *input_shape)
    lines = [f"; {line}" for line in comment.splitlines()] if comment else []
    lines += ["(vnnlib-version <2.0>)", "(declare-network N",
              f"    (declare-input X float32 [{','.join(str(s) for s in shape)}])",
              f"    (declare-output Y float32 [1,{num_outputs}])", ")"]
    for flat, index in enumerate(np.ndindex(*shape)):
        name = f"X[{','.join(str(i) for i in index)}]"
        lines.append(f"(assert (<= {name} {format_number(upper[flat])}))")
        lines.append(f"(assert (>= {name} {format_number(lower[flat])}))")
    lines.append("(assert (or")
    lines += [f"    (>= Y[0,{j}] Y[0,{label}])" for j in range(num_outputs) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- 1.0 reader

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VARIABLE = re.compile(r"^([XY])_(\d+)$")


def _parse_sexprs(text: str, path: Path) -> list[tuple[int, list]]:
    """Top-level S-expressions with the line each starts on; comments (';' to end of line) dropped."""
    forms: list[tuple[int, list]] = []
    stack: list[tuple[int, list]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(";", 1)[0]
        for token in _TOKEN.findall(line):
            if token == "(":
                stack.append((number, []))
            elif token == ")":
                if not stack:
                    raise UserError(f"{path}: line {number}: unbalanced ')'")
                start, items = stack.pop()
                if stack:
                    stack[-1][1].append(items)
                else:
                    forms.append((start, items))
            elif not stack:
                raise UserError(f"{path}: line {number}: unexpected {token!r} outside parentheses")
            else:
                stack[-1][1].append(token)
    if stack:
        raise UserError(f"{path}: line {stack[0][0]}: unbalanced '(' (file truncated?)")
    return forms


class _Reader:
    """State of one 1.0 parse: declarations, bounds, output condition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.declared: dict[str, set[int]] = {"X": set(), "Y": set()}
        self.lower: dict[int, tuple[float, int]] = {}
        self.upper: dict[int, tuple[float, int]] = {}
        self.output_conditions: list[list[list[tuple[dict[str, float], float]]]] = []  # CNF of DNFs

    def fail(self, line: int, message: str) -> UserError:
        return UserError(f"{self.path}: line {line}: {message}")

    def number(self, token, line: int) -> float:
        if not isinstance(token, str):
            raise self.fail(line, f"expected a number, got {_show(token)}")
        try:
            value = float(token)
        except ValueError:
            raise self.fail(line, f"expected a number, got {token!r}") from None
        if math.isnan(value):
            raise self.fail(line, "NaN in a constraint")
        if math.isinf(value):
            raise self.fail(line, "infinite constant in a constraint")
        return value

    def linear(self, term, line: int) -> tuple[dict[str, float], float]:
        """A linear term → ({variable: coefficient}, constant)."""
        if isinstance(term, str):
            match = _VARIABLE.match(term)
            if match:
                kind, index = match.group(1), int(match.group(2))
                if index not in self.declared[kind]:
                    raise self.fail(line, f"{term} is used but not declared")
                return {term: 1.0}, 0.0
            return {}, self.number(term, line)
        if not term:
            raise self.fail(line, "empty term ()")
        head, args = term[0], term[1:]
        parts = [self.linear(a, line) for a in args]
        if head == "+" and parts:
            return _combine(parts, [1.0] * len(parts))
        if head == "-" and len(parts) == 1:
            return _combine(parts, [-1.0])
        if head == "-" and parts:
            return _combine(parts, [1.0] + [-1.0] * (len(parts) - 1))
        if head == "*" and len(parts) == 2:
            (va, ca), (vb, cb) = parts
            if va and vb:
                raise self.fail(line, "non-linear product of variables")
            scale, (vars_, const) = (ca, parts[1]) if not va else (cb, parts[0])
            return {k: v * scale for k, v in vars_.items()}, const * scale
        raise self.fail(line, f"unsupported term {_show(term)}")

    def atom(self, expr, line: int) -> tuple[dict[str, float], float]:
        """A comparison → (coefficients, constant) meaning sum(coef·var) + constant <= 0."""
        if not isinstance(expr, list) or len(expr) != 3 or expr[0] not in ("<=", ">=", "<", ">"):
            raise self.fail(line, f"expected a comparison (<= a b) or (>= a b), got {_show(expr)}")
        (vl, cl), (vr, cr) = self.linear(expr[1], line), self.linear(expr[2], line)
        sign = 1.0 if expr[0] in ("<=", "<") else -1.0
        coefs = {k: sign * (vl.get(k, 0.0) - vr.get(k, 0.0)) for k in set(vl) | set(vr)}
        coefs = {k: v for k, v in coefs.items() if v != 0.0}
        return coefs, sign * (cl - cr)

    def input_bound(self, coefs: dict[str, float], const: float, line: int) -> None:
        if len(coefs) != 1:
            raise self.fail(line, "non-box input constraint (more than one input variable)")
        (name, coef), = coefs.items()
        index = int(name[2:])
        value = -const / coef
        if coef > 0:  # coef·X + const <= 0  →  X <= -const/coef
            if index not in self.upper or value < self.upper[index][0]:
                self.upper[index] = (value, line)
        elif index not in self.lower or value > self.lower[index][0]:
            self.lower[index] = (value, line)

    def output_row(self, coefs: dict[str, float], const: float, num_outputs: int) -> tuple[np.ndarray, float]:
        row = np.zeros(num_outputs)
        for name, coef in coefs.items():
            row[int(name[2:])] = coef
        return row, -const

    def classify(self, coefs: dict[str, float], line: int) -> str:
        kinds = {name[0] for name in coefs}
        if kinds == {"X"}:
            return "X"
        if kinds == {"Y"}:
            return "Y"
        if not kinds:
            raise self.fail(line, "constraint without variables")
        raise self.fail(line, "non-box input constraint (mixes input and output variables)")

    def conjunction(self, expr, line: int) -> list:
        """Atoms of an atom or an (and ...)."""
        if isinstance(expr, list) and expr and expr[0] == "and":
            atoms = []
            for item in expr[1:]:
                atoms += self.conjunction(item, line)
            return atoms
        return [expr]

    def assertion(self, expr, line: int) -> None:
        if isinstance(expr, list) and expr and expr[0] == "or":
            branches = []
            for branch in expr[1:]:
                atoms = []
                for atom in self.conjunction(branch, line):
                    coefs, const = self.atom(atom, line)
                    if self.classify(coefs, line) == "X":
                        raise self.fail(line, "non-box input constraint (input variable inside a disjunction)")
                    atoms.append((coefs, const))
                branches.append(atoms)
            if not branches:
                raise self.fail(line, "empty (or)")
            self.output_conditions.append(branches)
            return
        outputs = []
        for atom in self.conjunction(expr, line):
            coefs, const = self.atom(atom, line)
            if self.classify(coefs, line) == "X":
                self.input_bound(coefs, const, line)
            else:
                outputs.append((coefs, const))
        if outputs:
            self.output_conditions.append([outputs])

    def declare(self, form: list, line: int) -> None:
        if len(form) != 3 or not isinstance(form[1], str) or form[2] != "Real":
            raise self.fail(line, f"expected (declare-const NAME Real), got {_show(form)}")
        match = _VARIABLE.match(form[1])
        if not match:
            raise self.fail(line, f"variable {form[1]!r} is neither X_i nor Y_j")
        kind, index = match.group(1), int(match.group(2))
        if index in self.declared[kind]:
            raise self.fail(line, f"{form[1]} declared twice")
        self.declared[kind].add(index)


def _combine(parts: list[tuple[dict[str, float], float]], signs: list[float]) -> tuple[dict[str, float], float]:
    coefs: dict[str, float] = {}
    const = 0.0
    for (vars_, c), s in zip(parts, signs):
        for k, v in vars_.items():
            coefs[k] = coefs.get(k, 0.0) + s * v
        const += s * c
    return coefs, const


def _show(expr) -> str:
    if isinstance(expr, list):
        text = "(" + " ".join(_show(e) for e in expr) + ")"
    else:
        text = str(expr)
    return text if len(text) <= 60 else text[:57] + "..."


def read_vnnlib(path: str | Path, num_inputs: int | None = None, num_outputs: int | None = None) -> VnnlibProperty:
    """Parse a VNN-LIB 1.0 file with a box input set; bad files raise a one-line UserError (file, line)."""
    path = Path(path)
    try:
        text = read_stored(path).decode()
    except FileNotFoundError:
        raise UserError(f"missing VNN-LIB file {path}") from None
    except (OSError, UnicodeDecodeError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read VNN-LIB file {path}: {type(exc).__name__}") from None
    reader = _Reader(path)
    forms = _parse_sexprs(text, path)
    for line, form in forms:
        if form and form[0] == "declare-const":
            reader.declare(form, line)
    for line, form in forms:
        if not form or not isinstance(form[0], str):
            raise reader.fail(line, f"unexpected form {_show(form)}")
        if form[0] == "declare-const":
            continue
        if form[0] != "assert" or len(form) != 2:
            raise reader.fail(line, f"unsupported command {_show(form)} (VNN-LIB 1.0 has declare-const and assert)")
        reader.assertion(form[1], line)
    for kind, expected in (("X", num_inputs), ("Y", num_outputs)):
        found = reader.declared[kind]
        if found != set(range(len(found))):
            raise UserError(f"{path}: {kind}_* variables are not numbered 0..{len(found) - 1}")
        if expected is not None and len(found) != expected:
            what = "input" if kind == "X" else "output"
            raise UserError(f"{path}: declares {len(found)} {what} variables {kind}_*, the network has {expected}")
    n_in, n_out = len(reader.declared["X"]), len(reader.declared["Y"])
    if n_in == 0 or n_out == 0:
        raise UserError(f"{path}: declares no {'input' if n_in == 0 else 'output'} variables")
    lower, upper = np.empty(n_in), np.empty(n_in)
    for i in range(n_in):
        if i not in reader.lower or i not in reader.upper:
            side = "lower" if i not in reader.lower else "upper"
            raise UserError(f"{path}: input X_{i} has no {side} bound (the input set must be a box)")
        (lo, lo_line), (hi, hi_line) = reader.lower[i], reader.upper[i]
        if lo > hi:
            raise UserError(f"{path}: line {max(lo_line, hi_line)}: X_{i} lower bound {lo!r} > upper bound {hi!r}")
        lower[i], upper[i] = lo, hi
    disjuncts: list[Disjunct] = [(np.zeros((0, n_out)), np.zeros(0))]
    for dnf in reader.output_conditions:
        if len(disjuncts) * len(dnf) > MAX_DISJUNCTS:
            raise UserError(f"{path}: output condition has more than {MAX_DISJUNCTS} disjuncts")
        product = []
        for a, b in disjuncts:
            for branch in dnf:
                rows = [reader.output_row(coefs, const, n_out) for coefs, const in branch]
                product.append((np.concatenate([a, np.stack([r for r, _ in rows])]),
                                np.concatenate([b, np.array([c for _, c in rows])])))
        disjuncts = product
    if not reader.output_conditions:
        disjuncts = []
    return VnnlibProperty(lower, upper, disjuncts, n_out)


# ------------------------------------------------------------------------------------------ 2.0 check


def check_vnnlib2(path: Path, lower: np.ndarray, upper: np.ndarray, label: int, num_outputs: int) -> str:
    """Parse a 2.0 file with the `vnnlib` package; its compat transform must give exactly our box and
    output rows. Returns 'ok', or a note saying why the check was skipped (package not installed)."""
    try:
        import vnnlib
        import vnnlib.compat
    except ImportError:
        return "skipped: the vnnlib package (VNN-LIB 2.0 parser) is not installed"
    try:
        cases = vnnlib.compat.transform(vnnlib.parse_query_file(str(path)))
    except Exception as exc:
        raise UserError(f"{path}: the vnnlib package rejects it: {str(exc).splitlines()[0][:200]}") from None
    lower = np.asarray(lower, dtype=np.float64).reshape(-1)
    upper = np.asarray(upper, dtype=np.float64).reshape(-1)
    expected = sorted(tuple(a[0].tolist()) + (float(b[0]),) for a, b in robustness_violation(label, num_outputs))
    # The compat form writes the violation as polytopes A·y <= b; ours is e_label - e_j, b = 0 per j.
    for case in cases:
        box = np.asarray(case.input_box, dtype=np.float64)
        if box.shape != (lower.size, 2) or not (np.array_equal(box[:, 0], lower) and np.array_equal(box[:, 1], upper)):
            raise UserError(f"{path}: the vnnlib package reads a different input box")
        rows = sorted(tuple(r) + (float(b),) for p in case.output_constraints for r, b in zip(p.coeff_matrix, p.rhs))
        if rows != expected:
            raise UserError(f"{path}: the vnnlib package reads a different output condition")
    if not cases:
        raise UserError(f"{path}: the vnnlib package finds no specification case")
    return "ok"
