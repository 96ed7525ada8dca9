"""Accuracy of both backends at large offsets and huge magnitudes: the figures of docs/numerics.md.

    python scripts/numerics_probe.py [--seed N]

For float32 input [256, 64] (normal data of spread 1, every unit offset by `offset` spreads) and
for huge inputs (spread `std`, no offset), prints per backend the relative error of the entropy H
and the largest relative error of the variance against a float64 (float64 input: 80-bit long
double) reference computed on the same, already rounded, input, and the largest error of dH/dx
relative to max |dH/dx|. Huge inputs also show how many variances came back +Inf (beyond the
statistics type) and the share of dx elements that are exactly 0.

The gradient at large offsets, float32 [48, 96] (units of random spread and sign): per unit, the
largest |dx - ref| and the common-mode part |sum_b dx_b| / B (the true dH/dx sums to 0 over the
batch), both relative to the unit's largest |ref|; the worst unit, for Lbe>BatchEntropy
(`batch_entropy`), Lbe>BatchEntropies (`batch_entropies` of two tensors) and the pure-TF path.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lbe_ops  # noqa: E402

PI_E = np.pi * np.e


def reference(x):
    flat = x.astype(np.longdouble)
    b, u = flat.shape
    mean = flat.mean(0)
    var = ((flat - mean) ** 2).sum(0) / (b - 1)
    h = (0.5 * np.log1p(PI_E * var)).mean()
    grad = PI_E * (flat - mean) / (u * (b - 1) * (PI_E * var + 1))
    return h, var, grad


def run(x, backend):
    x = tf.constant(x)
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        tape.watch(x)
        h, _, var = lbe_ops.batch_entropy_moments(x)
    grad = tape.gradient(h, x)
    return [np.asarray(t.numpy(), np.longdouble) for t in (h, var, grad)]


def errors(x, backend):
    h_ref, var_ref, g_ref = reference(x)
    h, var, g = run(x, backend)
    finite = var_ref <= np.finfo(x.dtype).max  # representable in the statistics type
    var_err = np.max(np.abs(var[finite] - var_ref[finite]) / var_ref[finite]) if finite.any() else 0
    return (float(abs(h - h_ref) / abs(h_ref)), float(var_err),
            float(np.max(np.abs(g - g_ref)) / np.max(np.abs(g_ref))),
            int(np.isposinf(var).sum()), float(np.mean(g == 0)))


def unit_gradient_errors(x, grouped, backend):
    """(per-unit error, common-mode part) of dH/dx, worst unit; see the module docstring."""
    tensor = tf.constant(x)
    other = tf.constant(x[:, ::-1] * 0.5)
    with lbe_ops.use_backend(backend), tf.GradientTape() as tape:
        tape.watch(tensor)
        h = lbe_ops.batch_entropies([tensor, other])[0] if grouped else lbe_ops.batch_entropy(tensor)
    dx = np.asarray(tape.gradient(h, tensor).numpy(), np.longdouble)
    ref = reference(x)[2]
    scale = np.abs(ref).max(axis=0)
    per_unit = np.abs(dx - ref).max(axis=0) / scale
    common_mode = np.abs(dx.sum(axis=0)) / (dx.shape[0] * scale)
    return float(per_unit.max()), float(common_mode.max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"lbe_ops from {os.path.dirname(lbe_ops.__file__)}, "
          f"backend {lbe_ops.backend_info()['backend']}")
    print("\nfloat32 [256, 64], offset x spread: rel. err of H, max rel. err of var, "
          "max |dx err| / max |dx|")
    for offset in [1e0, 1e2, 1e4, 1e5, 1e6]:
        x = (rng.standard_normal((256, 64)) + offset).astype(np.float32)
        cells = []
        for backend in ["op", "tf"]:
            h, v, g, _, _ = errors(x, backend)
            cells.append(f"{backend}: H {h:.1e}  var {v:.1e}  dx {g:.1e}")
        print(f"  {offset:7.0e}   " + "   |   ".join(cells))
    print("\nfloat32 [48, 96] dH/dx, offset x spread: worst unit's error, per unit / common-mode part")
    for offset in [1e1, 1e3, 1e4, 1e5, 1e6]:
        spread = rng.uniform(0.5, 2.0, 96)
        x = (rng.standard_normal((48, 96)) * spread
             + offset * spread * rng.choice([-1, 1], 96)).astype(np.float32)
        cells = []
        for label, grouped, backend in [("BatchEntropy", False, "op"),
                                        ("BatchEntropies", True, "op"), ("tf", False, "tf")]:
            per_unit, common = unit_gradient_errors(x, grouped, backend)
            cells.append(f"{label}: {per_unit:.1e} / {common:.1e}")
        print(f"  {offset:7.0e}   " + "   |   ".join(cells))
    print("\nhuge values [B, 64] of spread std: the same, + variances that are +Inf, "
          "share of dx that is 0")
    for dtype, batch, std in [(np.float32, 64, 3e17), (np.float32, 1000, 1e18),
                              (np.float32, 1000, 1e19), (np.float32, 64, 1e30),
                              (np.float32, 64, 1e37), (np.float64, 1000, 1e200),
                              (np.float64, 1000, 1e300)]:
        x = (rng.standard_normal((batch, 64)) * std).astype(dtype)
        cells = []
        for backend in ["op", "tf"]:
            h, v, g, inf, zero = errors(x, backend)
            cells.append(f"{backend}: H {h:.1e}  var {v:.1e}  dx {g:.1e}  inf {inf}  dx=0 {zero:.2f}")
        print(f"  {np.dtype(dtype).name} B={batch:<5d} {std:7.0e}   " + "   |   ".join(cells))


if __name__ == "__main__":
    main()
