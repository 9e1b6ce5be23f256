"""What several test files share: inputs in every memory layout, per-channel parameters, tolerances against the
float64 reference, and the generator state the fused ops draw their dropout key from."""
import torch

from bnfused import ops

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Forward and gradient tolerances of a fused result against the float64 reference of the same input.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
GRAD_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}


def rng_state(device):
    """State of the default generator the fused op draws its key from on `device`."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def make_input(shape, layout, dtype, device, offset=0.2, scale=1.0):
    """Random tensor of `shape` (randn * scale + offset) in `layout`: "contiguous", "channels_last" (channels_last
    or channels_last_3d) or "noncontig" (every other element of the last dim)."""
    if layout == "noncontig":
        return (torch.randn(*shape[:-1], 2 * shape[-1], device=device) * scale + offset).to(dtype)[..., ::2]
    x = (torch.randn(shape, device=device) * scale + offset).to(dtype)
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()]) if layout == "channels_last" else x


def make_params(channels, device, acc, affine=True):
    """(weight, bias, running_mean, running_var) of `channels` channels in dtype acc, away from the identity so
    every term of the formulas matters; weight and bias require grad (None without affine)."""
    w = (torch.rand(channels, device=device, dtype=acc) + 0.5).requires_grad_() if affine else None
    b = (torch.randn(channels, device=device, dtype=acc) * 0.3).requires_grad_() if affine else None
    rm = torch.randn(channels, device=device, dtype=acc) * 0.2
    rv = torch.rand(channels, device=device, dtype=acc) + 0.5
    return w, b, rm, rv


def leaf(t, dtype=None, requires_grad=None):
    """A detached copy of t (None stays None) as a new autograd leaf, in dtype; requires_grad defaults to t's."""
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad if requires_grad is None else requires_grad)


def kernel_format(x):
    """The memory format the fused ops give their output for input x."""
    return ops.kernel_memory_format(x)
