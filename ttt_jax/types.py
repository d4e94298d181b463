"""Small pytrees shared by the layers: sequence metadata."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int


@struct.dataclass
class SequenceMetadata:
    """Where a chunk of tokens sits in its stream.

    Attributes:
      position_ids: absolute positions ``[B, L]``; optional.
      offset: position of the chunk's first token, a Python int or an int array ``[B]``, used to
        generate positions when ``position_ids`` is absent (streaming continues a stream).
    """

    position_ids: Optional[Int[Array, "B L"]] = None
    offset: int | Int[Array, "B"] = 0

    def positions(self, batch: int, length: int) -> Int[Array, "B L"]:
        """Absolute positions ``[B, L]``: the given ids, or ``offset + arange(L)``."""
        if self.position_ids is not None:
            pos = jnp.asarray(self.position_ids)
            if pos.ndim == 1:
                pos = pos[None, :]
            if pos.shape[-1] != length or pos.shape[0] not in (1, batch):
                raise ValueError(
                    f"SequenceMetadata.position_ids has shape {pos.shape}: expected "
                    f"[{batch}, {length}] (or [1, {length}]) to match the input")
            return jnp.broadcast_to(pos, (batch, length))
        offset = jnp.asarray(self.offset, dtype=jnp.int32).reshape(-1, 1)
        return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))
