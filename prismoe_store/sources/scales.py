"""Scaled and packed tensors: apply the scales exactly, or refuse with what was found.

FP8 releases (DeepSeek-V3/R1, Qwen3-FP8) store ``W`` as ``F8_E4M3`` codes plus a float32 tensor
``W_scale_inv`` of one scale per ``128 × 128`` block, and ``W = codes · scale``
(compressed-tensors' ``W_scale`` per tensor or per row works the same way). Reading such a tensor
without its scales gives values off by the scale (×10⁻⁴ .. ×10⁴): here the scales are found,
their block size is taken from ``config.json`` (``quantization_config.weight_block_size``) or
from the shapes when they leave no doubt, and every value is ``float32(code) · float32(scale)``
— one float32 product, exactly what ``w.float() * s.float()`` gives in torch.

Formats that need more than a scale (zero points, packed int4, bitsandbytes, MXFP4 blocks) are
refused by name.

>>> import numpy as np
>>> from prismoe_store.sources.records import TensorInfo, CheckpointFacts
>>> infos = {"w": TensorInfo("w", (300, 200), "F8_E4M3"), "w_scale_inv": TensorInfo("w_scale_inv", (3, 2), "F32")}
>>> find_scale(infos, "w", CheckpointFacts(block_size=(128, 128))).block
(128, 128)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prismoe_store.errors import QuantizedTensorError
from prismoe_store.sources.records import NO_FACTS, BlockScale, CheckpointFacts, TensorInfo

SCALE_SUFFIXES = ("_scale_inv", "_scale")  # ``<weight><suffix>`` multiplies the stored values
UNSUPPORTED_SUFFIXES = ("_zero_point", "_global_scale", "_packed", "_shape", "_blocks", "_scales", "_g_idx")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_FLOATS = ("F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16")


def find_scale(infos: Mapping[str, TensorInfo], name: str, facts: CheckpointFacts = NO_FACTS,
               where: str = "the checkpoint") -> BlockScale | None:
    """How tensor ``name`` is scaled (``None``: its values are stored as they are).

    Raises :class:`QuantizedTensorError` for companions this module cannot apply, for a scale
    whose block size cannot be told, and for FP8 codes that ``config.json`` says are scaled but
    whose scales are absent.
    """
    info = infos[name]
    stem = name.removesuffix(".weight")
    extra = sorted(n for n in infos if n != name and (
        n.startswith(name + ".") or n in {name + s for s in UNSUPPORTED_SUFFIXES} or n == stem + ".SCB"))
    if extra:
        raise QuantizedTensorError(
            f"{name!r} in {where} is stored quantized with {', '.join(extra[:4])}: this tool applies only "
            "plain scales (FP8 weight_scale_inv / weight_scale); extract from an unquantized checkpoint")
    scales = [name + s for s in SCALE_SUFFIXES if name + s in infos]
    if not scales:
        if info.dtype in FP8_DTYPES and facts.quant_method:
            raise QuantizedTensorError(
                f"{name!r} in {where} holds FP8 codes and config.json names quantization {facts.quant_method!r}, "
                f"but there is no {name}_scale_inv / {name}_scale: its values cannot be known")
        return None
    if len(scales) > 1:
        raise QuantizedTensorError(f"{name!r} in {where} has two scale tensors ({', '.join(scales)}): ambiguous")
    scale = infos[scales[0]]
    if scale.dtype not in _FLOATS:
        raise QuantizedTensorError(f"scale {scale.name!r} in {where} has dtype {scale.dtype}, not a float type")
    if not info.is_matrix:
        raise QuantizedTensorError(f"{name!r} in {where} is scaled but is not a matrix (shape {info.shape})")
    return BlockScale(scale.name, *_block(info.shape, scale.shape, facts, scale.name, where))


def _block(shape: tuple[int, ...], scale_shape: tuple[int, ...], facts: CheckpointFacts, scale_name: str,
           where: str) -> tuple[tuple[int, int], str]:
    rows, cols = shape
    grid = tuple(scale_shape)
    if len(grid) <= 1 and int(np.prod(grid, dtype=np.int64)) == 1:
        return (rows, cols), "one scale for the whole tensor"
    if grid == (rows,):
        grid = (rows, 1)
    if len(grid) != 2:
        raise QuantizedTensorError(f"scale {scale_name!r} in {where} has shape {scale_shape}, not a grid of blocks")
    if facts.block_size is not None:
        br, bc = facts.block_size
        if (-(-rows // br), -(-cols // bc)) != grid:
            raise QuantizedTensorError(
                f"scale {scale_name!r} in {where} is {grid[0]}×{grid[1]}, but config.json's weight_block_size "
                f"{br}×{bc} over a {rows}×{cols} tensor needs {-(-rows // br)}×{-(-cols // bc)}")
        return (br, bc), "config.json quantization_config.weight_block_size"
    ubr, ubc = _unique_block(rows, grid[0]), _unique_block(cols, grid[1])
    if ubr is None or ubc is None:
        raise QuantizedTensorError(
            f"scale {scale_name!r} in {where} is {grid[0]}×{grid[1]} over a {rows}×{cols} tensor: the block size "
            "cannot be told from the shapes; put the model's config.json (with quantization_config."
            "weight_block_size) beside the checkpoint")
    return (ubr, ubc), "the only block size the shapes allow"


def _unique_block(n: int, blocks: int) -> int | None:
    """The one block length ``b`` with ``ceil(n / b) == blocks`` (``None``: none or several)."""
    if blocks < 1 or blocks > n:
        return None
    if blocks == 1:
        return n
    lo, hi = -(-n // blocks), (n - 1) // (blocks - 1)  # every b in [lo, hi] gives `blocks` blocks
    return lo if lo == hi and -(-n // lo) == blocks else None


def apply_scale(values: np.ndarray, grid: np.ndarray, block: tuple[int, int], rows: slice, cols: slice) -> None:
    """Multiply ``values`` (region ``rows × cols`` of the tensor, float32) in place by its block scales.

    ``grid`` is the whole scale tensor as float32 (0-D, 1-D per row, or 2-D per block).

    >>> v = np.ones((2, 3), np.float32)
    >>> apply_scale(v, np.array([[2.0, 3.0]], np.float32), (4, 2), slice(0, 2), slice(1, 4)); v
    array([[2., 3., 3.],
           [2., 3., 3.]], dtype=float32)
    """
    br, bc = block
    grid = grid.reshape(-1, 1) if grid.ndim < 2 else grid
    r_idx = np.arange(rows.start, rows.stop) // br if grid.shape[0] > 1 else np.zeros(rows.stop - rows.start, int)
    c_idx = np.arange(cols.start, cols.stop) // bc if grid.shape[1] > 1 else np.zeros(cols.stop - cols.start, int)
    values *= grid[np.ix_(r_idx, c_idx)]
