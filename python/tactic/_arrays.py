"""Framework-neutral array helpers.

The core takes any DLPack-capable array with no copy; these helpers only decide *where*
outputs are allocated so that results come back in the caller's framework (numpy, torch,
CuPy, JAX) and on the caller's device.
"""
from __future__ import annotations

import numpy as np

_DTYPE_NAMES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def framework(x) -> str:
    """'numpy', 'torch', 'cupy', 'jax' or 'other' for an array object."""
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return "numpy"
    if mod in ("torch", "cupy"):
        return mod
    if mod in ("jax", "jaxlib"):
        return "jax"
    return "other"


def dtype_name(dtype) -> str:
    """Normalise 'float16', np.float16, torch.bfloat16, ... to 'float16'/'bfloat16'/'float32'."""
    name = str(dtype).replace("torch.", "").replace("<class 'numpy.", "").rstrip("'>")
    if name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    try:
        name = np.dtype(dtype).name
    except TypeError:
        pass
    if name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    raise TypeError(f"`dtype` must be 'float16', 'bfloat16' or 'float32', got {dtype!r}")


def prepare(x, name: str):
    """Check that `x` is an array and return a view the core can read without a copy."""
    if x is None:
        raise TypeError(f"`{name}` must be an array, got None")
    fw = framework(x)
    if fw == "torch" and x.requires_grad:
        x = x.detach()  # a view: DLPack export refuses tensors that require grad
    if fw == "other" and hasattr(x, "__dlpack__") and not hasattr(x, "shape"):
        # a bare DLPack producer: numpy wraps CPU memory without a copy (and refuses others)
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError) as e:
            raise TypeError(f"`{name}`: a bare DLPack object must hold CPU memory ({e})") from e
    if fw == "other" and not (hasattr(x, "__dlpack__") or hasattr(x, "__array_interface__")):
        raise TypeError(
            f"`{name}` must be an array (numpy, torch, CuPy, JAX or any DLPack object), "
            f"got {type(x).__name__}")
    if fw == "jax" and _is_jax_tracer(x):
        raise TypeError(
            f"`{name}` is a traced JAX value (inside jax.jit, vmap or grad): Tactic reads concrete "
            f"arrays, so call it outside the transformation (or through jax.pure_callback)")
    # Arrays DLPack cannot describe would reach the bindings and fail there: refuse them here,
    # by name. (ml_dtypes' bfloat16, numpy's usual stand-in, is read as its uint16 bits.)
    if fw == "numpy" and not _is_numpy_bfloat16(x) and (
            not x.dtype.isnative or x.dtype.kind not in "fiub" or x.dtype.fields):
        raise TypeError(f"`{name}` must be a numeric array in native byte order, got dtype {x.dtype}")
    if fw == "torch":
        if str(x.layout) != "torch.strided":
            raise TypeError(f"`{name}` must be a dense (strided) tensor, got layout {x.layout}")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"`{name}` must be on a cpu or cuda device, got {x.device}")
    return x


def _is_jax_tracer(x) -> bool:
    import jax
    return isinstance(x, jax.core.Tracer)


def _is_numpy_bfloat16(x) -> bool:
    return x.dtype.name == "bfloat16" and x.dtype.itemsize == 2


def writable(x, name: str):
    """`x` prepared as an output: an array the core may write into (read-only numpy views,
    e.g. np.broadcast_to results, are refused here with a message naming the argument)."""
    x = prepare(x, name)
    if framework(x) == "numpy" and not x.flags.writeable:
        raise ValueError(f"`{name}` must be a writable array, got a read-only numpy view")
    if framework(x) == "jax":
        raise TypeError(f"`{name}` cannot be a JAX array (immutable); pass a numpy or torch array")
    return x


def device_of(x) -> str:
    fw = framework(x)
    if fw == "torch":
        return str(x.device)
    if fw == "cupy":
        return f"cuda:{x.device.id}"
    if fw == "jax":
        dev = list(x.devices())[0]
        return "cpu" if dev.platform == "cpu" else f"cuda:{dev.id}"
    return "cpu"


def empty(like, shape, dtype: str):
    """An uninitialised array in `like`'s framework and device, writable by the core.

    JAX arrays are immutable, so for JAX the core writes into numpy and `finish` converts.
    """
    fw = framework(like)
    if fw == "torch":
        import torch
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}[dtype]
        return torch.empty(tuple(shape), dtype=tdt, device=like.device)
    if fw == "cupy":
        import cupy
        with cupy.cuda.Device(like.device.id):
            return cupy.empty(tuple(shape), dtype=_np_dtype(dtype))
    if fw == "jax" and device_of(like).startswith("cuda"):
        # JAX arrays are immutable: the core writes a CuPy (or torch) array on the same GPU,
        # which `finish` hands to JAX through DLPack without a copy.
        dev = int(device_of(like).split(":")[1])
        try:
            import cupy
            with cupy.cuda.Device(dev):
                return cupy.empty(tuple(shape), dtype=_np_dtype(dtype))
        except ImportError:
            import torch
            return empty(torch.empty(0, device=f"cuda:{dev}"), shape, dtype)
    if fw == "jax":
        return _aligned_empty(shape, _np_dtype(dtype))
    return np.empty(tuple(shape), dtype=_np_dtype(dtype))


# JAX's CPU client adopts a DLPack buffer without a copy only when it is this aligned.
_JAX_ALIGN = 64


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _JAX_ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _JAX_ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(tuple(shape))


def finish(like, arr):
    """Return `arr` (written by the core) in `like`'s framework."""
    if framework(like) == "jax" and isinstance(arr, np.ndarray):
        import jax
        import jax.numpy as jnp
        if _is_numpy_bfloat16(arr):  # numpy cannot export bfloat16 through DLPack: one copy
            return jnp.asarray(arr)
        return jax.dlpack.from_dlpack(arr)  # adopts the aligned buffer, no copy
    if framework(like) == "jax":
        import jax
        return jax.dlpack.from_dlpack(arr)
    return arr


def to_device(arr: np.ndarray, device: str):
    """A numpy array as a torch tensor on `device` ('cuda', 'cuda:N'); unchanged for 'cpu'."""
    if not str(device).startswith("cuda"):
        return arr
    import torch
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)


def current_stream(x) -> int:
    """The CUDA stream the caller's framework is using for `x` (0: the default stream)."""
    fw = framework(x)
    if fw == "torch" and x.is_cuda:
        import torch
        return int(torch.cuda.current_stream(x.device).cuda_stream)
    if fw == "cupy":
        import cupy
        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def from_numpy(like, arr: np.ndarray):
    """Wrap a numpy result (e.g. a selection mask) in `like`'s framework."""
    fw = framework(like)
    if fw == "torch":
        import torch
        return torch.from_numpy(arr)
    if fw == "cupy":
        import cupy
        return cupy.asarray(arr)
    if fw == "jax":
        import jax.numpy as jnp
        return jnp.asarray(arr)
    return arr


def array_dtype(x) -> str:
    """The element type name of an array of any framework ('float16', 'int64', ...)."""
    return str(x.dtype).replace("torch.", "")


def _np_dtype(name: str):
    if name == "bfloat16":
        try:
            import ml_dtypes
            return ml_dtypes.bfloat16
        except ImportError as e:  # numpy has no bfloat16 of its own
            raise TypeError("bfloat16 output with numpy inputs needs the `ml_dtypes` package; "
                            "pass float16/float32 queries or a torch tensor") from e
    return np.dtype(name)
