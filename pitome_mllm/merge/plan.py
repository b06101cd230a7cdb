"""The `Merge` plan: one merge step's decision, held as index tensors.

A merge step is decided once (under ``torch.no_grad`` in fp32, from a similarity
metric) and then applied to any tensor whose token axis matches the metric's:
hidden states, token sizes, source maps. Keeping the decision as plain indices
(rather than a closure, as ToMe does) lets callers inspect it, move it between
devices and compose it with later steps.

Layout of a step's output, ``[B, N - r, ...]``::

    [ kept tokens (copied unchanged) | destination tokens (each reduced with its sources) ]

For PiToMe the kept part is ``[CLS] + protected`` and the destinations are the B set;
for bipartite soft matching (ToMe) the kept part is the unmerged A set and the
destinations are all B tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REDUCE_MODES = ("mean", "sum", "amax", "amin", "prune")


class cached_property:  # noqa: N801  (named like the functools decorator it replaces)
    """``functools.cached_property`` without its lock: computed on first read, kept in the instance's ``__dict__``.

    Python 3.11's version enters an ``RLock`` on every first read, which ``torch.compile`` cannot
    trace (a graph break at every merge step). A `Merge` is built and read by one thread, so
    the lock guards nothing here.
    """

    def __init__(self, compute) -> None:
        self.compute = compute
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        cache = instance.__dict__
        if self.name not in cache:
            cache[self.name] = self.compute(instance)
        return cache[self.name]


@dataclass(frozen=True, eq=False)
class Merge:
    """One merge step as indices into the token axis of its input.

    Attributes:
        kept_idx: ``[B, K]`` input positions copied to output positions ``0..K-1``.
        dst_idx: ``[B, D]`` input positions of the destination tokens, written to output
            positions ``K..K+D-1``.
        src_idx: ``[B, r]`` input positions that are merged away.
        src_dst_pos: ``[B, r]`` for each source, the index ``0..D-1`` into ``dst_idx`` of
            the destination it is merged into.
        num_input_tokens: ``N``, the token count the plan was decided for.

    Every input position appears exactly once in ``kept_idx``, ``dst_idx`` or ``src_idx``.
    """

    kept_idx: torch.Tensor
    dst_idx: torch.Tensor
    src_idx: torch.Tensor
    src_dst_pos: torch.Tensor
    num_input_tokens: int

    # ------------------------------------------------------------------ sizes
    @property
    def num_removed(self) -> int:
        """``r``: how many tokens this step removes."""
        return int(self.src_idx.shape[1])

    @property
    def num_output_tokens(self) -> int:
        """``N - r``."""
        return self.num_input_tokens - self.num_removed

    @property
    def num_kept(self) -> int:
        return int(self.kept_idx.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.kept_idx.shape[0])

    # ------------------------------------------------------- derived indices
    @cached_property
    def _out_idx(self) -> torch.Tensor:
        """``[B, N - r]`` input position feeding each output position before reduction."""
        return torch.cat([self.kept_idx, self.dst_idx], dim=1)

    @cached_property
    def _scatter_idx(self) -> torch.Tensor:
        """``[B, r]`` output position each source is reduced into."""
        return self.src_dst_pos + self.num_kept

    # Applying works on ``x`` viewed as ``[B * N, C]`` rows: selecting whole rows by a
    # flat index copies each row in one go, where ``gather`` with an index expanded
    # over C looks up an index for every element (several times slower).
    @cached_property
    def _flat_out_rows(self) -> torch.Tensor:
        """``[B * (N - r)]`` row of the flattened input feeding each output row."""
        return _flatten_rows(self._out_idx, self.num_input_tokens)

    @cached_property
    def _flat_src_rows(self) -> torch.Tensor:
        """``[B * r]`` row of the flattened input of each source."""
        return _flatten_rows(self.src_idx, self.num_input_tokens)

    @cached_property
    def _flat_scatter_rows(self) -> torch.Tensor:
        """``[B * r]`` row of the flattened output each source is reduced into."""
        return _flatten_rows(self._scatter_idx, self.num_output_tokens)

    @cached_property
    def _group_sizes(self) -> torch.Tensor:
        """``[B, D, 1]`` fp32: how many input tokens each destination's group holds (itself included)."""
        sizes = torch.ones(self.dst_idx.shape, dtype=torch.float32, device=self.dst_idx.device)
        sizes.scatter_add_(1, self.src_dst_pos, torch.ones_like(sizes[:, :1]).expand_as(self.src_dst_pos))
        return sizes.unsqueeze(-1)

    @cached_property
    def output_position(self) -> torch.Tensor:
        """``[B, N]``: for every input token, the output token that holds it."""
        batch, n_out = self.batch_size, self.num_output_tokens
        device = self.kept_idx.device
        position = torch.empty(batch, self.num_input_tokens, dtype=torch.long, device=device)
        arange = torch.arange(n_out, device=device).expand(batch, n_out)
        position.scatter_(1, self._out_idx, arange)
        position.scatter_(1, self.src_idx, self._scatter_idx)
        return position

    def to(self, device: torch.device | str) -> Merge:
        return Merge(
            self.kept_idx.to(device),
            self.dst_idx.to(device),
            self.src_idx.to(device),
            self.src_dst_pos.to(device),
            self.num_input_tokens,
        )

    # -------------------------------------------------------------- applying
    def __call__(self, x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Apply the step to ``x``: ``[B, N, C] -> [B, N - r, C]``.

        ``reduce`` combines each destination with its sources: ``"mean"`` is the plain
        (unweighted) mean of the destination and all tokens merged into it, as the
        authors' LLaVA code does; ``"sum"``, ``"amax"``, ``"amin"`` likewise; ``"prune"``
        drops the sources and keeps destinations unchanged.
        """
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
        self._check_input(x)
        batch, _, channels = x.shape
        rows = x.reshape(-1, channels)  # [B * N, C]
        out = rows.index_select(0, self._flat_out_rows)  # [B * (N - r), C]
        if self.num_removed == 0 or reduce == "prune":
            return out.view(batch, -1, channels)
        src = rows.index_select(0, self._flat_src_rows)  # [B * r, C]
        if reduce in ("sum", "mean"):
            # The destination counts as one member of its own group: add the sources onto
            # it, then (mean) divide by the group size. Same arithmetic, in the same order,
            # as scatter_reduce_(..., include_self=True); dividing an unmerged destination
            # by 1 leaves it bit-identical.
            out.index_add_(0, self._flat_scatter_rows, src)
            out = out.view(batch, -1, channels)
            if reduce == "mean":
                out[:, self.num_kept :].div_(self._group_sizes.to(out.dtype))
            return out
        out = out.view(batch, -1, channels)
        index = self._scatter_idx.unsqueeze(-1).expand(batch, -1, channels)
        out.scatter_reduce_(1, index, src.view(batch, -1, channels), reduce=reduce, include_self=True)
        return out

    def weighted(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted merge (paper Alg. 1).

        Args:
            x: ``[B, N, C]`` token features.
            size: ``[B, N, 1]`` how many original tokens each token stands for (ones if None).

        Returns:
            ``(x', size')``: ``[B, N - r, C]`` the size-weighted mean of every group, and
            ``[B, N - r, 1]`` the summed sizes. ``sum(size' * x') == sum(size * x)``.
        """
        if size is None:
            size = torch.ones_like(x[..., :1])
        summed = self(x * size, reduce="sum")
        new_size = self(size, reduce="sum")
        return summed / new_size, new_size

    def track_source(self, token_map: torch.Tensor | None = None) -> torch.Tensor:
        """Compose source tracking through this step.

        Args:
            token_map: ``[B, N0]`` for each original token, its position in this step's
                input (``None``: this step's input is the original sequence).

        Returns:
            ``[B, N0]`` for each original token, its position in this step's output.
        """
        if token_map is None:
            return self.output_position.clone()
        return self.output_position.gather(1, token_map)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.num_input_tokens or x.shape[0] != self.batch_size:
            raise ValueError(
                f"this Merge was decided for [B={self.batch_size}, N={self.num_input_tokens}, C] "
                f"inputs, got shape {tuple(x.shape)}"
            )


def _flatten_rows(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, k]`` token positions -> ``[B * k]`` rows of a ``[B * num_tokens, C]`` view."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * num_tokens
    return (idx + offsets).reshape(-1)


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``features[b, indices[b, k]]`` for every ``b, k``: ``[B, N, C]`` and ``[B, K]`` -> ``[B, K, C]``."""
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def raster_order(token_map: torch.Tensor, num_tokens: int, offset: int = 0) -> torch.Tensor:
    """Order of the current tokens by the first original token each one holds.

    Args:
        token_map: ``[B, N0]`` current index of every original token.
        num_tokens: ``n``, the current token count.
        offset: leading current tokens left out (e.g. a dropped class token); also the
            number of leading original tokens ignored.

    Returns:
        ``[B, n - offset]`` indices (relative to the tokens after ``offset``) that sort
        them by their smallest original index.
    """
    batch, n_orig = token_map.shape
    current = token_map[:, offset:] - offset  # [B, N0 - offset]
    first = torch.full((batch, num_tokens - offset), n_orig, dtype=torch.long, device=token_map.device)
    original_index = torch.arange(n_orig - offset, device=token_map.device).expand(batch, -1)
    first.scatter_reduce_(1, current, original_index, reduce="amin", include_self=True)
    return first.argsort(dim=1, stable=True)


def to_raster_order(
    features: torch.Tensor, size: torch.Tensor, token_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged tokens back in reading order (by each one's first original token), with their sizes and map.

    Args:
        features: ``[B, n, C]`` merged tokens.
        size: ``[B, n, 1]`` original tokens each holds.
        token_map: ``[B, N0]`` current index of every original token.

    Returns:
        ``(features, size, token_map)`` reordered; the map points at the new positions.
    """
    order = raster_order(token_map, features.shape[1])  # [B, n]
    inverse = order.argsort(dim=1)
    return gather_tokens(features, order), size.gather(1, order.unsqueeze(-1)), inverse.gather(1, token_map)


def identity_merge(batch_size: int, num_tokens: int, device: torch.device | str = "cpu") -> Merge:
    """A plan that removes nothing (``r = 0``)."""
    kept = torch.arange(num_tokens, device=device).expand(batch_size, num_tokens)
    empty = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    return Merge(kept, empty, empty, empty, num_tokens)


def source_matrix(token_map: torch.Tensor, num_output_tokens: int) -> torch.Tensor:
    """Dense assignment matrix from a token map.

    Args:
        token_map: ``[B, N0]`` output position of each original token.
        num_output_tokens: ``n``.

    Returns:
        ``[B, n, N0]`` float tensor, 1 where output token ``j`` holds original token ``i``
        (the same layout as ToMe's ``source``).
    """
    batch, n_orig = token_map.shape
    source = torch.zeros(batch, num_output_tokens, n_orig, device=token_map.device)
    source.scatter_(1, token_map.unsqueeze(1), 1.0)
    return source
