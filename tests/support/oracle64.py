"""The float64 numpy oracle of the batch-entropy math (what both backends are held to), and the
error model the kernels are held to. Needs numpy only (no TensorFlow, no lbe_ops), so that
benchmarks/gpu_check.py can use it on a GPU machine without TensorFlow; the tests import it as
`oracle64` (tests/conftest.py puts tests/support/ on the path).

For x of shape [B, d1, ...], flattened to [B, U]:

    mean_u = sum_b x_bu / B,   var_u = sum_b (x_bu - mean_u)^2 / (B - ddof)
    H = mean_u 0.5 * ln(pi * e * var_u + 1)
    dx_bu = (x_bu - mean_u) * (g_H * pi*e / (U (B - ddof) (pi*e var_u + 1)) + 2 g_var_u / (B - ddof))
            + g_mean_u / B
"""

import numpy as np

PI_E = np.pi * np.e


def _flat(x):
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def _deviations(flat):
    """(mean [U], flat - mean) in float64, each unit first shifted by its value in row 0 (where
    finite): at an offset far above the spread, x - x_0 is exact, so the deviations keep float64
    precision relative to the spread (a plain float64 mean of values near 1e12 would not)."""
    with np.errstate(invalid="ignore"):
        pivot = np.where(np.isfinite(flat[0]), flat[0], 0.0)
        shifted = flat - pivot
        shifted_mean = shifted.mean(axis=0)
        return pivot + shifted_mean, shifted - shifted_mean


def moments(x, ddof=1):
    """(entropy, mean [U], variance [U]) of x [B, ...] in float64."""
    flat = _flat(x)
    mean, deviations = _deviations(flat)
    var = (deviations ** 2).sum(axis=0) / (flat.shape[0] - ddof)
    return 0.5 * np.log1p(PI_E * var).mean(), mean, var


def entropy(x, ddof=1):
    """The batch entropy of x [B, ...] in float64."""
    return moments(x, ddof)[0]


def backward(x, ddof=1, g_entropy=1.0, g_mean=None, g_var=None, mean=None, var=None):
    """dx (shape of x, float64) for the upstream gradients of the entropy, and optionally of the
    mean and variance [U]. With mean and/or var given (the backward kernel's inputs) the formula
    is evaluated at those statistics, so that a check sees the backward kernel's error only;
    without mean, x is centred on its exact mean."""
    x = np.asarray(x)
    flat = _flat(x)
    b, u = flat.shape
    if var is None:
        var = moments(flat, ddof)[2]
    if mean is None:
        deviations = _deviations(flat)[1]
    else:
        deviations = flat - np.asarray(mean, np.float64).ravel()
    var = np.asarray(var, np.float64).ravel()
    scale = g_entropy * PI_E / (u * (b - ddof) * (PI_E * var + 1))
    if g_var is not None:
        scale = scale + 2.0 * np.asarray(g_var, np.float64).ravel() / (b - ddof)
    dx = deviations * scale
    if g_mean is not None:
        dx = dx + np.asarray(g_mean, np.float64).ravel() / b
    return dx.reshape(x.shape)


def entropy_grad(x, ddof=1):
    """dH/dx in float64."""
    return backward(x, ddof)


# ---- error model -------------------------------------------------------------------------------

def _name(dtype):
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def output_eps(dtype):
    """Unit roundoff of the output dtype (a name, or a numpy dtype)."""
    return {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24,
            "float64": 2.0 ** -53}[_name(dtype)]


def acc_eps(dtype):
    """Unit roundoff of the accumulation: float32 for float16, bfloat16 and float32 inputs."""
    return 2.0 ** -53 if _name(dtype) == "float64" else 2.0 ** -24


def forward_errors(x, ddof, entropy_value, mean, var, dtype, offset=0.0):
    """(ok, finite, errors, tolerances) of a forward result against the reference at x (the
    values the kernel saw, any dtype). Errors are relative: the mean's to max |x|, the variance's
    to max var, the entropy's to |H|.

    Error model: the mean of data offset by k standard deviations is known to about eps * k
    standard deviations in the accumulation type, which bounds the variance (and the entropy) at
    about eps * k relative; `offset` is the data's offset in units of its scale (k = 2 offset)."""
    h, m, v = moments(x, ddof)
    x64 = _flat(x)
    mean = np.asarray(mean, np.float64).ravel()
    var = np.asarray(var, np.float64).ravel()
    entropy_value = float(np.asarray(entropy_value, np.float64).ravel()[0])
    finite = bool(np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
                  and np.isfinite(entropy_value))
    eps, k = acc_eps(dtype), 2.0 * offset
    err = {
        "mean": float(np.max(np.abs(mean - m)) / (np.max(np.abs(x64)) + 1e-300)),
        "variance": float(np.max(np.abs(var - v)) / (np.max(v) + 1e-300)),
        "entropy": float(abs(entropy_value - h) / (abs(h) + 1e-300)),
    }
    tol = {"mean": 64 * eps, "variance": eps * (256 + 8 * k),
           "entropy": eps * (256 + 8 * k) + 2 * output_eps(dtype)}
    ok = finite and all(err[key] < tol[key] for key in err)
    return ok, finite, err, tol


def backward_errors(dx, want, dtype):
    """(ok, finite, error, tolerance) of a gradient against `want` (backward() at the statistics
    the kernel was given), both relative to max |want|."""
    dx = np.asarray(dx, np.float64)
    want = np.asarray(want, np.float64)
    finite = bool(np.all(np.isfinite(dx)))
    scale = float(np.max(np.abs(want))) + 1e-300
    # float16 gradients are often subnormal (dx ~ 1 / (units x batch)): spacing 2**-24 there.
    floor = 2.0 ** -24 if _name(dtype) == "float16" else 0.0
    err = float(np.max(np.abs(dx.ravel() - want.ravel())))
    tol = scale * (4 * output_eps(dtype) + 64 * acc_eps(dtype)) + floor
    return finite and err < tol, finite, err / scale, tol / scale
