"""The 2-D checkerboard data set of the toy experiment (`docs/math.md` §4.8, oracle §9.33).

The board is a 4x4 grid of cells of side 2 covering [-4, 4]^2. Cell (i, j) spans
[2i - 4, 2i - 2) x [2j - 4, 2j - 2), with i counted along x (coordinate 0) and j along y
(coordinate 1) from the lower-left corner; it is white when i + j is even. The data density is
uniform on the 8 white cells (1/32 on each, 0 elsewhere).

==============================  ==============================================================
function                        docs/math.md
==============================  ==============================================================
`WHITE_CELLS`                   §4.8 the white cells (i, j), i + j even
`white_cell_index`              §4.8 white-cell number 0..7 -> (i, j)
`checkerboard_from_uniforms`    §4.8 x = 4(((i, j) + U) 2/4 - 1) for a chosen white cell
`sample_checkerboard`           §4.8 iid exact sampler
`checkerboard_batch`            §4.8 the training batch of one step, [B, 1, 1, 2] (§0.1 layout)
`checkerboard_batches`          §4.8 infinite iterator of those batches
`is_in_white_cell`              §9.33 floor((x1 + 4)/2) + floor((x2 + 4)/2) even, on the board
`sample_checkerboard_labeled`   §4.8 the same points as `sample_checkerboard`, with their cells
`sample_checkerboard_class`     §4.8 exact samples of requested classes (uniform on each cell)
`labeled_checkerboard_batch`    §4.8 + §4.4 the class-conditional batch: points and labels
`white_cell_bounds`             lower-left corner and upper-right corner of white cells
==============================  ==============================================================

The class-conditional checkerboard (issue 16): white cell c = 0..7 (`WHITE_CELLS[c]`) is class c,
uniform on its cell; the unconditional density is the equal mixture of the 8 classes, so a labeled
batch's points are exactly the unconditional batch's (the label is the cell the point was drawn in).
Label dropout to the null label 8 happens in the train step (§4.4), not here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BOARD_HALF_WIDTH = 4.0
"""The board is [-BOARD_HALF_WIDTH, BOARD_HALF_WIDTH]^2 (`scale`=4 in the reference)."""

CELLS_PER_SIDE = 4
"""Number of cells along each axis (`n_rc`=4 in the reference)."""

CELL_SIZE = 2.0 * BOARD_HALF_WIDTH / CELLS_PER_SIDE
"""Side length of one cell (2)."""

WHITE_CELLS = np.array(
    [(i, j) for i in range(CELLS_PER_SIDE) for j in range(CELLS_PER_SIDE) if (i + j) % 2 == 0],
    dtype=np.int32,
)
"""[8, 2] integer cell indices (i along x, j along y) of the white cells, i + j even."""

NUM_WHITE_CELLS = len(WHITE_CELLS)
"""8 white cells; the density on each is 1 / (NUM_WHITE_CELLS * CELL_SIZE**2) = 1/32."""

POINT_SHAPE = (1, 1, 2)
"""A 2-D point as a sample: a 1x1 "image" with 2 channels (`docs/math.md` §0.1)."""


def _check_int(name: str, value, minimum: int) -> int:
    """Return `value` as an int, raising ValueError unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
    return int(value)


def white_cell_index(cell: Array) -> Array:
    """Map white-cell numbers 0..7 (int array, any shape [...]) to their (i, j) indices [..., 2]."""
    return jnp.asarray(WHITE_CELLS)[cell]


def checkerboard_from_uniforms(cell: Array, u: Array) -> Array:
    """Map white-cell numbers [...] in 0..7 and U [..., 2] in [0, 1] to points [..., 2] (float32).

    Implements x = 4(((i, j) + U) 2/4 - 1) of §4.8 as corner + 2U, clipped to the half-open cell
    [corner, corner + 2) so that float32 rounding can never move a point onto the next cell. (Below
    the border at 0 the clip uses the smallest normal float32, as XLA flushes subnormals to zero.)
    """
    u = jnp.asarray(u, jnp.float32)
    if u.ndim < 1 or u.shape[-1] != 2:
        raise ValueError(f"u must have shape [..., 2], got {u.shape}")
    corner = white_cell_index(cell).astype(jnp.float32) * CELL_SIZE - BOARD_HALF_WIDTH
    border = corner + CELL_SIZE
    below_zero = -np.finfo(np.float32).tiny
    upper = jnp.where(border == 0, below_zero, jnp.nextafter(border, corner))
    return jnp.clip(corner + CELL_SIZE * u, corner, upper)


@functools.partial(jax.jit, static_argnames="n")
def _sample_checkerboard_labeled(key: Array, n: int) -> tuple[Array, Array]:
    """Jitted body of `sample_checkerboard_labeled`: (points, white-cell numbers)."""
    key_cell, key_u = jax.random.split(key)
    cell = jax.random.randint(key_cell, (n,), 0, NUM_WHITE_CELLS)
    u = jax.random.uniform(key_u, (n, 2), jnp.float32)
    return checkerboard_from_uniforms(cell, u), cell.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="n")
def _sample_checkerboard(key: Array, n: int) -> Array:
    """Jitted body of `sample_checkerboard`: the labeled sampler's points (one set of draws)."""
    return _sample_checkerboard_labeled(key, n)[0]


def sample_checkerboard(key: Array, n: int) -> Array:
    """Draw n iid exact checkerboard samples [n, 2] float32 (uniform white cell, uniform in it).

    `n` is static (a Python int); the function is jitted and may also be called inside `jit`.
    """
    return _sample_checkerboard(key, _check_int("n", n, 1))


def sample_checkerboard_labeled(key: Array, n: int) -> tuple[Array, Array]:
    """(points [n, 2] float32, classes [n] int32): `sample_checkerboard(key, n)` and their cells.

    The points are bit-identical to `sample_checkerboard(key, n)` (same key splits and draws); the
    class of a point is the white-cell number 0..7 it was drawn in.
    """
    return _sample_checkerboard_labeled(key, _check_int("n", n, 1))


@jax.jit
def _sample_checkerboard_class(key: Array, labels: Array) -> Array:
    """Jitted body of `sample_checkerboard_class`."""
    u = jax.random.uniform(key, (*labels.shape, 2), jnp.float32)
    return checkerboard_from_uniforms(labels, u)


def sample_checkerboard_class(key: Array, labels) -> Array:
    """Exact samples [N, 2] float32 of classes `labels` [N] in 0..7: uniform on cell labels[i].

    Raises ValueError for labels outside 0..7 (the null label 8 has no density of its own).
    """
    labels_np = np.asarray(labels)
    if (
        labels_np.ndim != 1
        or labels_np.shape[0] < 1
        or not np.issubdtype(labels_np.dtype, np.integer)
    ):
        raise ValueError(
            f"labels must be integers of shape [N], N >= 1, got {labels_np.dtype} {labels_np.shape}"
        )
    if labels_np.min() < 0 or labels_np.max() >= NUM_WHITE_CELLS:
        raise ValueError(
            f"labels must lie in 0..{NUM_WHITE_CELLS - 1}, got values in "
            f"[{labels_np.min()}, {labels_np.max()}]"
        )
    return _sample_checkerboard_class(key, jnp.asarray(labels_np, jnp.int32))


def white_cell_bounds(labels) -> tuple[np.ndarray, np.ndarray]:
    """(lower-left corners, upper-right corners), each [..., 2] float64, of white cells `labels`."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or (
        labels.size and (labels.min() < 0 or labels.max() >= NUM_WHITE_CELLS)
    ):
        raise ValueError(f"labels must be integers in 0..{NUM_WHITE_CELLS - 1}, got {labels!r}")
    lower = WHITE_CELLS[labels].astype(np.float64) * CELL_SIZE - BOARD_HALF_WIDTH
    return lower, lower + CELL_SIZE


def labeled_checkerboard_batch(key: Array, step, batch_size: int) -> tuple[Array, Array]:
    """Class-conditional batch of `step`: (points [B, 1, 1, 2], labels [B] int32 in 0..7).

    The points are `checkerboard_batch(key, step, B)` bit for bit; the labels are their cells.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    x, labels = sample_checkerboard_labeled(jax.random.fold_in(key, step), batch_size)
    return x.reshape(batch_size, *POINT_SHAPE), labels


def checkerboard_batch(key: Array, step, batch_size: int) -> Array:
    """Training batch of `step`: sample_checkerboard(fold_in(key, step), B) as [B, 1, 1, 2]."""
    batch_size = _check_int("batch_size", batch_size, 1)
    x = sample_checkerboard(jax.random.fold_in(key, step), batch_size)
    return x.reshape(batch_size, *POINT_SHAPE)


def checkerboard_batches(key: Array, batch_size: int, start_step: int = 0) -> Iterator[Array]:
    """Infinite iterator of [B, 1, 1, 2] batches checkerboard_batch(key, s, B), s >= start_step."""
    batch_size = _check_int("batch_size", batch_size, 1)
    step = _check_int("start_step", start_step, 0)
    while True:
        yield checkerboard_batch(key, step, batch_size)
        step += 1


def is_in_white_cell(x) -> Array | np.ndarray:
    """True where a point x [..., 2] lies in a white cell of [-4, 4)^2; non-finite points: False.

    Cells are half-open, [2i - 4, 2i - 2), as floor((x + 4)/2) of oracle §9.33; the cell index is
    found by exact comparisons with the borders -2, 0, 2 (no rounding). A numpy input gives a numpy
    bool array (float64 stays float64); anything else gives a jax bool array (jit-safe).
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape [..., 2], got {x.shape}")
    inner_borders = [-BOARD_HALF_WIDTH + CELL_SIZE * k for k in range(1, CELLS_PER_SIDE)]
    index = sum((x >= b).astype(xp.int32) for b in inner_borders)
    on_board = (x >= -BOARD_HALF_WIDTH) & (x < BOARD_HALF_WIDTH)  # False for NaN and +-inf
    on_board = on_board[..., 0] & on_board[..., 1]
    return on_board & ((index[..., 0] + index[..., 1]) % 2 == 0)
