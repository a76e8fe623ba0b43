#!/usr/bin/env python3
"""Reference values for fedrec's distributed discrete Gaussian accountant (issue 12).

Writes `shared/tests/data/ddgauss_reference.txt`, read by `shared/tests/ddp_reference.rs`.

The reference is the DDGauss authors' own accounting code, `distributed_dp/accounting_utils.py`
of google-research/federated at commit 5e27a86323a35c2018fb97fbbe755c7ade9370ab (functions
`ddgauss_epsilon` and `ddgauss_params`). None of it is in this repository: put a copy of that
file (or of its pure-math functions) outside the repository and pass its path. If it imports
`tensorflow_privacy`, this script installs a stand-in whose `get_privacy_spent` is
dp-accounting's `compute_epsilon` (the same RDP-to-(eps, delta) conversion, Canonne, Kamath &
Steinke 2020, Proposition 12), so TensorFlow is not needed:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install dp-accounting==0.6.0 numpy scipy
    /tmp/refvenv/bin/python simulations/python/tools/ddgauss_reference.py \\
        --reference /tmp/accounting_utils.py --out shared/tests/data/ddgauss_reference.txt

Every reference epsilon is also recomputed by this script's own implementation of the paper's
formulas (Kairouz, Liu & Steinke, ICML 2021, Proposition 14 / Eq. 17 and Proposition 22; Zhu &
Wang, ICML 2019, Theorem 5), written from the papers, and the largest relative difference is
written into the file's header: a transcription error in either would show there.

Rows (one per case):
- `grid`: fedrec's own parameterisation. The grid step gamma and the per-device noise come from
  fedrec's formulas (docs/ddp.md, `shared/src/ddp/params.rs`) for a cohort of n devices that all
  survive (min_reports = n), target noise sigma = z * C, wrap bound p = 1e-9; the reference
  epsilon is the authors' `ddgauss_epsilon` at that gamma and local noise.
- `dme_run`, `dropout`, `fl`, `calib`: the authors' own calibration `ddgauss_params` (their
  choice of gamma with k standard deviations, and their local noise for a target epsilon) in the
  settings of their `dme_run.py` main(), of their `plot_client_dropout.py` (with n' survivors
  of a cohort calibrated for 100), of an `fl_utils.build_aggregator`-style federated run, and of
  fedrec's grid; the reference epsilon is their `ddgauss_epsilon` at their parameters.
"""

import argparse
import importlib.metadata
import importlib.util
import math
import sys
import time
import types

from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

COMMIT = "5e27a86323a35c2018fb97fbbe755c7ade9370ab"
ORDERS = list(range(2, 129)) + [256]
BETA = math.exp(-0.5)
WRAP_P = 1e-9


# ---------------------------------------------------------------------------------------------
# fedrec's parameterisation (docs/ddp.md "Bits, scale and the modular-clipping probability")
# ---------------------------------------------------------------------------------------------


def fedrec_gamma(n, m, dim, clip, sigma, bits, p=WRAP_P):
    """fedrec's grid step for a padded dimension `dim` (a power of two), or None if the bits
    cannot hold n devices. Mirrors the order of operations of `DdpParams::grid`."""
    room = 2.0 ** (bits - 1) - n
    if room <= 0:
        return None
    k = math.sqrt(2.0 * math.log(2.0 * dim / p))
    spread = math.sqrt(n * n * clip * clip / dim + n / m * sigma * sigma * (1.0 + 1.0 / 1024.0))
    return max(k * spread / room, clip / 2.0**40, sigma / (math.sqrt(m) * 2.0**30))


# ---------------------------------------------------------------------------------------------
# The accountant, from the papers (independent of the reference code)
# ---------------------------------------------------------------------------------------------


def rounded_l2(c, dim, beta):
    """Bound on the norm after conditional randomised rounding (DDGauss Proposition 22)."""
    always = c + math.sqrt(dim)
    if beta == 0:
        return always
    whp = c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(dim) / 2.0)
    return min(always, math.sqrt(whp))


def tau(grid_var, n):
    """DDGauss Theorem 1: distance of a sum of n discrete Gaussians from one."""
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * grid_var * k / (k + 1)) for k in range(1, n))


def own_epsilon(gamma, local_std, n, clip, beta, dim, q, steps, delta):
    """(eps, order) of `steps` Poisson-sampled rounds, from the papers' formulas."""
    c = clip / gamma
    l2 = rounded_l2(c, dim, beta)
    l1 = l2 * min(math.sqrt(dim), l2)
    grid_std = local_std / gamma
    sigma_t = math.sqrt(n) * grid_std
    t = tau(grid_std * grid_std, n)
    s2, s1 = l2 / sigma_t, l1 / sigma_t

    def eps(a):
        return min(
            a * s2 * s2 / 2.0 + t * dim,
            a / 2.0 * (s2 * s2 + 2.0 * t * s1 + t * t * dim),
            a / 2.0 * (s2 + math.sqrt(dim) * t) ** 2,
        )

    def sampled(a):
        # Zhu & Wang, Theorem 5, in log space.
        lq, l1q = math.log(q), math.log1p(-q)
        terms = [
            (a - 1) * l1q + math.log(a * q - q + 1),
            math.log(a * (a - 1) / 2.0) + 2 * lq + (a - 2) * l1q + eps(2),
        ]
        for l in range(3, a + 1):
            log_binom = math.lgamma(a + 1) - math.lgamma(l + 1) - math.lgamma(a - l + 1)
            terms.append(math.log(3.0) + log_binom + l * lq + (a - l) * l1q + (l - 1) * eps(l))
        top = max(terms)
        return (top + math.log(sum(math.exp(x - top) for x in terms))) / (a - 1)

    rdp = [steps * (eps(a) if q == 1 else min(sampled(a), eps(a))) for a in ORDERS]
    e, order = compute_epsilon(ORDERS, rdp, delta)
    return float(e), int(order)


# ---------------------------------------------------------------------------------------------
# The reference module
# ---------------------------------------------------------------------------------------------


def load_reference(path):
    try:
        import tensorflow_privacy  # noqa: F401
    except ImportError:
        shim = types.ModuleType("tensorflow_privacy")

        def get_privacy_spent(orders, rdp, target_eps=None, target_delta=None):
            assert target_eps is None, "only the delta -> epsilon direction is used"
            e, order = compute_epsilon(orders, rdp, target_delta)
            return e, target_delta, order

        shim.get_privacy_spent = get_privacy_spent
        sys.modules["tensorflow_privacy"] = shim
    spec = importlib.util.spec_from_file_location("ddgauss_reference_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("ddgauss_epsilon", "ddgauss_params"):
        if not hasattr(module, name):
            sys.exit(f"{path} has no {name}: is it distributed_dp/accounting_utils.py at {COMMIT}?")
    return module


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

COLUMNS = [
    "source", "n", "dim", "bits", "clip", "beta", "q", "steps", "delta",
    "target_eps", "k", "calibrated", "gamma", "local_std", "ref_eps", "ref_order",
]


def grid_cases():
    for n in (100, 1000):
        for dim in (2**16, 2**20):
            for bits in (12, 16, 20):
                for z in (0.5, 1.0, 2.0):
                    gamma = fedrec_gamma(n, n, dim, 1.0, z, bits)
                    for q, steps in ((1.0, 1), (1.0, 300), (0.01, 1), (0.01, 300)):
                        yield dict(source="grid", n=n, dim=dim, bits=bits, clip=1.0, beta=BETA,
                                   q=q, steps=steps, delta=1e-6, target_eps="-", k="-",
                                   calibrated=0, gamma=gamma, local_std=z / math.sqrt(n))
    # Too many devices for 12 bits: fedrec's grid leaves less than half a grid unit of device
    # noise, which DDGauss Theorem 1 does not cover; fedrec refuses, the reference answers.
    for z in (0.5, 1.0, 2.0):
        gamma = fedrec_gamma(1900, 1900, 2**16, 1.0, z, 12)
        yield dict(source="grid", n=1900, dim=2**16, bits=12, clip=1.0, beta=BETA, q=1.0,
                   steps=1, delta=1e-6, target_eps="-", k="-", calibrated=0, gamma=gamma,
                   local_std=z / math.sqrt(1900))


def authors_settings():
    """(source, n_calibrated, survivors, dim, bits, clip, q, steps, delta, target_eps, k)."""
    # dme_run.py main(): nd_zip (100, 250), (1000, 250) -> padded 256; bits 10..16; C = 10;
    # k_stddevs flag default 2; delta 1e-5; q = 1, steps = 1; a subset of its epsilons.
    for n in (100, 1000):
        for bits in (10, 12, 14, 16):
            for eps in (0.75, 1.0, 2.0, 4.0, 6.0):
                yield ("dme_run", n, [n], 256, bits, 10.0, 1.0, 1, 1e-5, eps, 2)
    # plot_client_dropout.py: n = 100, q = 1, bits 32, delta 1e-5, d = 2^20, k = 4, C = 1,
    # 1500 steps, initial epsilons 1..8; epsilon again after 10..60 % of the clients drop.
    for eps in (1.0, 2.0, 4.0, 6.0, 8.0):
        yield ("dropout", 100, [100, 90, 80, 70, 60, 50, 40], 2**20, 32, 1.0, 1.0, 1500, 1e-5, eps, 4)
    # fl_utils.build_aggregator style: 100 clients per round of 3400, delta = 1/N, k = 4,
    # C = 0.03, epsilon 10, 1500 rounds; d = 2^20 stands in for the model size.
    for bits in (16, 20):
        yield ("fl", 100, [100], 2**20, bits, 0.03, 100 / 3400, 1500, 1 / 3400, 10.0, 4)
    # fedrec's grid, calibrated the authors' way at epsilon 4 (k = 4, their FL default).
    for n in (100, 1000):
        for dim in (2**16, 2**20):
            for bits in (12, 16, 20):
                yield ("calib", n, [n], dim, bits, 1.0, 1.0, 1, 1e-6, 4.0, 4)
    for n, bits in ((100, 16), (1000, 16), (1000, 20)):
        yield ("calib", n, [n], 2**16, bits, 1.0, 0.01, 300, 1e-6, 4.0, 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help=f"accounting_utils.py at {COMMIT}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", action="append", default=[],
                    help="a line for the file's header (say what --reference was)")
    args = ap.parse_args()
    ref = load_reference(args.reference)

    rows, skipped, max_rel = [], [], 0.0

    def add(row):
        nonlocal max_rel
        e, order = ref.ddgauss_epsilon(row["gamma"], row["local_std"], row["n"], row["clip"],
                                       row["beta"], row["dim"], row["q"], row["steps"],
                                       row["delta"])
        own, _ = own_epsilon(row["gamma"], row["local_std"], row["n"], row["clip"], row["beta"],
                             row["dim"], row["q"], row["steps"], row["delta"])
        e = float(e)
        if math.isfinite(e) and e > 0:
            max_rel = max(max_rel, abs(own - e) / e)
        rows.append(dict(row, ref_eps=e, ref_order=int(order)))

    for row in grid_cases():
        if row["gamma"] is not None:
            add(row)
    for source, n0, survivors, dim, bits, clip, q, steps, delta, eps, k in authors_settings():
        t0 = time.time()
        try:
            gamma, local_std = ref.ddgauss_params(q, eps, clip, bits, n0, dim, delta, BETA, steps,
                                                  k=k)
        except ValueError as err:
            skipped.append(f"{source} n={n0} dim={dim} bits={bits} eps={eps}: {err}")
            continue
        gamma, local_std = float(gamma), float(local_std)
        got, _ = ref.ddgauss_epsilon(gamma, local_std, n0, clip, BETA, dim, q, steps, delta)
        if not (gamma > 0 and local_std > 0 and abs(float(got) - eps) <= 1e-3 * eps):
            skipped.append(f"{source} n={n0} dim={dim} bits={bits} eps={eps}: their optimiser "
                           f"returned gamma={gamma!r}, local_std={local_std!r} (eps {float(got)!r})")
            continue
        for n in survivors:
            add(dict(source=source, n=n, dim=dim, bits=bits, clip=clip, beta=BETA, q=q,
                     steps=steps, delta=delta, target_eps=eps, k=k,
                     calibrated=int(n == n0), gamma=gamma, local_std=local_std))
        print(f"{source} n={n0} dim={dim} bits={bits} eps={eps}: {time.time() - t0:.1f} s",
              file=sys.stderr)

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}"
                         for p in ("dp-accounting", "numpy", "scipy"))
    with open(args.out, "w") as f:
        f.write(f"""# Reference epsilons for fedrec's DDGauss accountant (shared/tests/ddp_reference.rs).
# Written by simulations/python/tools/ddgauss_reference.py with Python {sys.version.split()[0]}, {versions}.
# ref_eps, ref_order: ddgauss_epsilon(gamma, local_std, n, clip, beta, dim, q, steps, delta) of
#   google-research/federated@{COMMIT} distributed_dp/accounting_utils.py
#   (RDP_ORDERS 2..128 and 256; tfp.get_privacy_spent replaced by dp_accounting's compute_epsilon,
#   the same conversion). n = survivors, dim = padded dimension D, local_std = one device's noise
#   standard deviation in model units (their convention), gamma = grid step (model units).
# grid rows: gamma from fedrec's formula (shared/src/ddp/params.rs) for n_cohort = min_reports = n,
#   sigma = z * clip with z = local_std * sqrt(n), p = 1e-9; target_eps, k unused.
# other rows: gamma, local_std from the authors' ddgauss_params(q, target_eps, clip, bits, n, dim,
#   delta, beta, steps, k) for a cohort of n (calibrated = 1), or for 100 with n survivors
#   (dropout rows with calibrated = 0).
# Cross-check: this script's own implementation of the papers' formulas gives the same epsilons
#   to a largest relative difference of {max_rel:.3e}.
""")
        for line in args.note:
            f.write(f"# {line}\n")
        for s in skipped:
            f.write(f"# skipped (the reference's calibration failed): {s}\n")
        f.write(",".join(COLUMNS) + "\n")
        for r in rows:
            f.write(",".join(repr(r[c]) if isinstance(r[c], float) else str(r[c]) for c in COLUMNS)
                    + "\n")
    print(f"{len(rows)} rows, {len(skipped)} skipped, own vs reference max rel diff {max_rel:.3e}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
