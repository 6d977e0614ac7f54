"""Numerical gradient checking (seed notes: "Numerical approximation of gradients"), with an error bar.

Every analytic gradient entry g (from :func:`gpunn.nn.backward`) is compared with the central difference

    D(h) = (J(p + h) - J(p - h)) / 2h

in float64 on the host. A fixed threshold on the relative error cannot tell the truth for every network: D(h) has
two errors of its own (Nocedal & Wright, *Numerical Optimization*, 2nd ed., sec. 8.1; Moré & Wild, "Estimating
computational noise", SIAM J. Sci. Comput. 33, 2011), and both grow with the size of the problem:

- truncation, h^2 |J'''| / 6, from the Taylor series;
- rounding, about sigma / h, where sigma is the noise with which float64 evaluates J: at least half an ulp of J,
  and more as J grows and sums more terms (784-10-10 on 32 samples: J = 2.6, sigma = 2.2e-16; the same network
  with unit-variance weights, the former test problem: J = 99, sigma = 7e-15).

So each entry gets its own *expected error*, measured on the function rather than assumed:

- the step is h = u^(1/3) max(1, |p|) (u = 2^-53), which balances the two terms when |J'''| is of the order of
  |J|, rounded down to a power of two so that p +- h and p +- 2h are exact and the divisor is exactly 2h;
- truncation is estimated per entry from a second step: D(h) = g + c h^2 + O(h^4) and D(2h) = g + 4 c h^2 + ...,
  so c h^2 = (D(2h) - D(h)) / 3 (Richardson);
- the noise sigma of J is estimated from the fourth differences J(p-2h) - 4 J(p-h) + 6 J(p) - 4 J(p+h) + J(p+2h)
  of all entries: their smooth part h^4 J'''' is some 1e-21 and negligible, so what remains is rounding, with
  standard deviation sqrt(70) sigma (the ECnoise idea of Moré & Wild, pooled over every parameter);
- the rounding error of D(h) is (e+ - e-) / 2h, standard deviation sigma / (sqrt(2) h); the bound allows
  :data:`COVERAGE` of those, so that the largest of a million correct entries stays inside it.

An entry passes when |g - D(h)| <= |D(2h) - D(h)| / 3 + COVERAGE sigma / (sqrt(2) h). The bound is computed from
J's evaluations alone, never from g, so a wrong gradient cannot widen its own error bar. A correct gradient's
error is typically a quarter of its bound (at most about half, over 300 random networks); a wrong sign, a missing
1/m or a wrong derivative is thousands of times above it. (On the former test problem, the former step 1e-7 left a
rounding error of about sigma / (sqrt(2) h) = 5e-8 per entry, on gradients of about 0.2: a relative 2.5e-7, which
the former fixed threshold of 1e-7 called a failure.)

ReLU is not differentiable at 0. When p +- 2h moves a hidden pre-activation across 0, D(h) measures a slope that
does not exist at p (cs231n's "kinks in the objective"), so such entries are counted and left out of the verdict.

J is evaluated by :func:`gpunn.nn.forward` and :func:`gpunn.nn.cost` themselves, for a few hundred stencil points
at a time (see :func:`_differences`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpunn.nn import _HIDDEN, Architecture, Layer, Trace, backward, cost, forward, l2_cost, one_hot

#: unit roundoff of float64
U = 2.0 ** -53
#: relative step: h = STEP * max(1, |p|), rounded down to a power of two
STEP = U ** (1 / 3)
#: standard deviations of D(h)'s rounding noise allowed per entry. Rounding noise is a sum of many small errors;
#: the largest of N Gaussian draws is about sqrt(2 ln 2N) standard deviations (5.7 for N = 10^7), and over 300 random
#: networks (1 to 100 samples, every activation, with and without L2) the largest correct entry reached 4.8. 10
#: leaves room for heavier tails, and a real error is 10^3 and more times the bound, so it hides nothing.
COVERAGE = 10.0
#: floats held at once by the stacked copies and their activations (32 MiB)
BATCH_FLOATS = 1 << 22

# Read by gpunn/cli.py's gradcheck command until it prints format_report(); remove both with that change.
EPSILON = STEP
THRESHOLD = 1e-7


@dataclass(frozen=True)
class ParameterCheck:
    """One parameter array's verdict: each entry's |analytic - numeric| against that entry's expected error.

    ``error`` and ``expected_error`` are those of the entry nearest to (or furthest above) its bound, and ``ratio``
    their quotient: at most 1 passes.
    """

    name: str  # "W1", "b1", ...
    size: int  # entries in the array
    error: float  # |analytic - numeric| at the worst entry
    expected_error: float  # that entry's expected error: what float64 can resolve there
    ratio: float  # error / expected_error, the largest over the entries
    failed: int  # entries whose difference exceeds their expected error
    skipped: int  # entries whose stencil crosses a ReLU kink, where the difference quotient measures no derivative
    relative_error: float  # ||analytic - numeric|| / (||analytic|| + ||numeric||), the seed notes' figure, for display
    max_abs_difference: float  # the largest |analytic - numeric| over the entries
    noise: float  # sigma, the estimated rounding noise of one evaluation of J (the same for every array)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def passed(checks: Sequence[ParameterCheck]) -> bool:
    """True when every entry of every array is within its expected error."""
    return all(check.ok for check in checks)


def check_gradients(params: Sequence[Layer], X: np.ndarray, Y: np.ndarray, arch: Architecture, *, l2: float = 0.0,
                    gradients: Sequence[Layer] | None = None) -> list[ParameterCheck]:
    """Analytic against numerical gradients, one :class:`ParameterCheck` per parameter array (W1, b1, W2, ...).

    X: (n_0, m), Y: (n_L, m). Everything runs in float64 on the host, whatever the dtype passed. ``gradients``: the
    analytic gradients to check, as :func:`gpunn.nn.backward` returns them (a learner's own backward pass, say); by
    default this module's ``backward``, which is :func:`gpunn.nn.backward`.
    """
    params = [Layer(np.array(W, dtype=np.float64), np.array(b, dtype=np.float64)) for W, b in params]
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    trace = forward(params, X, arch)
    if gradients is None:
        gradients = backward(params, trace, Y, arch, l2=l2)
    # what _differences evaluates at p: the cost alone (it adds only the L2 term's changes, not the term itself)
    J0 = float(cost(trace.Z[-1], Y, arch.output))

    arrays = [(f"{kind}{l}", l - 1, k) for l in range(1, arch.depth + 1) for k, kind in enumerate("Wb")]
    coefficients = _penalty_coefficients(params, l2, X.shape[1]) if l2 else (0.0, 0.0)
    differences = {name: _differences(params, trace, Y, arch, coefficients[k], layer, k) for name, layer, k in arrays}

    # J's rounding noise, pooled over the entries that reach J and cross no kink (entries that leave J bitwise
    # unchanged, like a dead unit's weights, would dilute it: with one sample, half the units are dead). J's last
    # rounding alone is up to half an ulp, so sigma never falls below that.
    fourth = np.concatenate([d.fourth[~(d.kink | d.flat)] for d in differences.values()])
    sigma = max(float(np.sqrt(np.mean(fourth ** 2) / 70)) if fourth.size else 0.0, float(np.spacing(abs(J0))) / 2,
                np.finfo(np.float64).smallest_normal)

    checks = []
    for name, layer, k in arrays:
        d = differences[name]
        judged = ~d.kink
        g = np.asarray(gradients[layer][k], dtype=np.float64).reshape(-1)[judged]
        numeric = d.D1[judged]
        error = np.abs(g - numeric)
        bound = np.abs(d.D2 - d.D1)[judged] / 3 + COVERAGE * sigma / (math.sqrt(2) * d.h[judged])
        ratio = error / bound
        worst = int(np.argmax(ratio)) if ratio.size else None
        denominator = np.linalg.norm(g) + np.linalg.norm(numeric)
        checks.append(ParameterCheck(
            name=name, size=d.h.size,
            error=float(error[worst]) if worst is not None else 0.0,
            expected_error=float(bound[worst]) if worst is not None else 0.0,
            ratio=float(ratio[worst]) if worst is not None else 0.0,
            failed=int(np.count_nonzero(ratio > 1)), skipped=int(np.count_nonzero(d.kink)),
            relative_error=float(np.linalg.norm(g - numeric) / denominator) if denominator else 0.0,
            max_abs_difference=float(error.max(initial=0.0)), noise=sigma))
    return checks


def format_report(checks: Sequence[ParameterCheck]) -> list[str]:
    """The lines ``gpunn gradcheck`` prints: how the expected error is made, a table with one row per array (its
    worst entry), and a last line with the verdict, ending in ": ok" or ": FAILED"."""
    lines = [
        f"numeric: central differences D(h) in float64, h = 2^k <= {STEP:.1e} * max(1, |p|); rounding noise of J: "
        f"sigma = {checks[0].noise:.1e}",
        f"expected error of each entry: |D(2h) - D(h)| / 3 (truncation) + {COVERAGE:g} sigma / (sqrt(2) h) (rounding)",
        "parameter  entries  |analytic - numeric|  expected error  error/expected  relative error",
    ]
    for c in checks:
        note = f"  <- {c.failed:,} above the expected error" if c.failed else ""
        if c.skipped:
            note += f"  ({c.skipped:,} skipped: the step crosses a ReLU kink)"
        lines.append(f"{c.name:>9}  {c.size:7,}  {c.error:20.2e}  {c.expected_error:14.2e}  {c.ratio:14.2g}  "
                     f"{c.relative_error:14.2e}{note}")
    worst = max(checks, key=lambda c: c.ratio)
    entries = sum(c.size - c.skipped for c in checks)
    if passed(checks):
        lines.append(f"all {entries:,} entries within their expected error (the closest, in {worst.name}, at "
                     f"{worst.ratio:.2g} of it): ok")
    else:
        failed = sum(c.failed for c in checks)
        lines.append(f"{failed:,} of {entries:,} entries above their expected error (the worst, in {worst.name}, "
                     f"{worst.ratio:.2g} times it): FAILED")
    return lines


@dataclass
class _Differences:
    """Per entry of one parameter array (flattened): the step, both central differences, the fourth difference,
    and whether the stencil crosses a ReLU kink."""

    h: np.ndarray
    D1: np.ndarray
    D2: np.ndarray
    fourth: np.ndarray
    kink: np.ndarray
    flat: np.ndarray  # J bitwise the same at all five points: the entry does not reach J (a dead unit's weight)


# the stencil, in units of h; row 0 of every batch is the unperturbed point
_OFFSETS = np.array([-2.0, -1.0, 1.0, 2.0])


def _differences(params: list[Layer], trace: Trace, Y: np.ndarray, arch: Architecture, coefficient: float,
                 layer: int, k: int) -> _Differences:
    """J at p - 2h, p - h, p, p + h, p + 2h for every entry of ``params[layer][k]`` (W for k = 0, b for k = 1).

    An entry of layer l enters J only through Z[l] = W[l] A[l-1] + b[l]: moving W[l][i, j] by d adds
    d A[l-1][j, :] to row i of Z[l], and moving b[l][i] by d adds d. So Z[l] is formed that way for a few hundred
    stencil points at once, stacked along a leading axis, and the rest of the network runs through nn.forward and
    nn.cost themselves (the stack broadcasts through ``W @ A + b``). This costs the layers after l per point, not
    the whole network: recomputing W[1] @ X for each of 4 x 7,840 points of 784-10-10 would be 99 % of the work.
    """
    P = params[layer][k]
    p = P.reshape(-1)
    # a power of two, at most STEP max(1, |p|): p +- h and p +- 2h are then exact, and so are the divisors
    h = np.exp2(np.floor(np.log2(STEP * np.maximum(1.0, np.abs(p)))))
    A_prev, Z0 = trace.A[layer], trace.Z[layer + 1]
    m = Z0.shape[1]
    rows, cols = np.divmod(np.arange(p.size), P.shape[1])  # entry -> (unit i, input j)
    last = layer == arch.depth - 1
    rest = None if last else Architecture(arch.sizes[layer + 1:], arch.activation, arch.output)
    g = _HIDDEN[arch.activation][0]  # the hidden activation nn.forward applies, not a copy of it
    floats = sum(arch.sizes[layer + 1:]) * m * 3  # per stencil point: Z and A of every later layer, with room
    per_batch = max(1, (BATCH_FLOATS // floats - 1) // len(_OFFSETS))
    J = np.empty((p.size, len(_OFFSETS)))
    J0 = np.empty(p.size)
    kink = np.zeros(p.size, dtype=bool)
    for start in range(0, p.size, per_batch):
        entries = np.arange(start, min(start + per_batch, p.size))
        point = np.repeat(entries, len(_OFFSETS))
        step = np.tile(_OFFSETS, entries.size) * h[point]
        Z = np.repeat(Z0[None], 1 + point.size, axis=0)
        # the row that moving the entry by 1 adds to Z[l][i, :]: A[l-1][j, :] for a weight, ones for a bias
        direction = A_prev[cols[point]] if k == 0 else 1.0
        Z[np.arange(1, Z.shape[0]), rows[point]] += step[:, None] * direction
        if last:
            Zs = [Z]
        else:
            Zs = [Z, *forward(params[layer + 1:], g(Z), rest).Z[1:]]
        values = np.array([float(cost(Z_L, Y, arch.output)) for Z_L in Zs[-1]])
        if coefficient:
            # the L2 term is a sum over entries, so moving p by d changes it by c ((p + d)^2 - p^2) = c d (2p + d)
            values[1:] += coefficient * step * (2 * p[point] + step)
        J0[entries] = values[0]
        J[entries] = values[1:].reshape(entries.size, len(_OFFSETS))
        if arch.activation == "relu":
            # a kink is crossed where a hidden pre-activation changes sign between the unperturbed point and any
            # point of the stencil (layers before l do not change)
            for Z_l in Zs[:-1]:
                changed = (Z_l[1:] > 0) != (Z_l[:1] > 0)
                kink[entries] |= changed.reshape(entries.size, -1).any(axis=1)
    D1 = (J[:, 2] - J[:, 1]) / (2 * h)
    D2 = (J[:, 3] - J[:, 0]) / (4 * h)
    fourth = J[:, 0] - 4 * J[:, 1] + 6 * J0 - 4 * J[:, 2] + J[:, 3]
    flat = (J == J0[:, None]).all(axis=1)
    return _Differences(h, D1, D2, fourth, kink, flat)


def _penalty_coefficients(params: Sequence[Layer], l2: float, m: int) -> tuple[float, float]:
    """c_W and c_b such that nn.l2_cost(params) = c_W sum(W^2) + c_b sum(b^2), read from nn.l2_cost itself (of a
    one-entry layer), so that the numerical side follows nn's definition of the L2 term and not a copy of it."""
    one, zero = np.ones((1, 1)), np.zeros((1, 1))
    c_W, c_b = (float(l2_cost([Layer(W, b)], l2, m)) for W, b in ((one, zero), (zero, one)))
    modelled = sum(c_W * float(np.sum(W * W)) + c_b * float(np.sum(b * b)) for W, b in params)
    actual = float(l2_cost(params, l2, m))
    assert abs(modelled - actual) <= 1e-12 * abs(actual), "nn.l2_cost is no longer a weighted sum of squares"
    return c_W, c_b


def random_problem(arch: Architecture, *, samples: int, seed: int) -> tuple[list[Layer], np.ndarray, np.ndarray]:
    """Weights N(0, 1/n_in), biases and inputs N(0, 1), and random labels.

    With weights scaled by the fan-in, every pre-activation is about N(0, 2) whatever the layer widths, as in a
    network being trained: the units are neither all saturated nor all linear, about a quarter of the ReLU
    pre-activations lie in [-1, 0), and the gradients are well above the difference quotient's rounding error.
    """
    rng = np.random.default_rng(seed)
    params = [Layer(rng.normal(size=(n_out, n_in)) / math.sqrt(n_in), rng.normal(size=(n_out, 1)))
              for n_in, n_out in zip(arch.sizes[:-1], arch.sizes[1:])]
    X = rng.normal(size=(arch.sizes[0], samples))
    if arch.output == "softmax":
        Y = one_hot(rng.integers(0, arch.sizes[-1], samples), arch.sizes[-1], np.float64)
    else:
        Y = rng.integers(0, 2, (arch.sizes[-1], samples)).astype(np.float64)
    return params, X, Y
