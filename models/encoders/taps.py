"""Which hidden states of a frozen encoder are tapped, and where its transformer blocks live.

"Layer i" is HF ``hidden_states[i]``: 0 = the input of the first block (the embeddings), i = the output of
block i-1 ... i.e. of the i-th block, and ``num_layers`` = the model's final-normed ``last_hidden_state``
(intermediate layers are not normed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn


def select_layers(
    num_layers: int,
    layers: Sequence[int] | None = None,
    stride: int | None = None,
    start: int | None = None,
) -> tuple[int, ...]:
    """Hidden-state ids to tap, ascending, each in ``[0, num_layers]`` (docs/DESIGN.md §2).

    - ``layers``: explicit ids; negative ids count Python-style over the ``num_layers + 1`` hidden states
      (-1 = ``num_layers`` = last, final-normed).
    - ``stride`` k: ``range(start, num_layers + 1, k)`` with default ``start = k - 1`` (Krea2 / UniFusion tap
      2, 5, ..., 35 of a 36-layer model).
    - neither: ``(num_layers,)``, the last layer only.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    n_states = num_layers + 1
    if layers is not None and stride is not None:
        raise ValueError(f"give either layers={list(layers)} or stride={stride}, not both")
    if layers is not None:
        if start is not None:
            raise ValueError(f"start={start} only applies with stride; got explicit layers={list(layers)}")
        ids = list(layers)
        if not ids:
            raise ValueError("layers is empty; give at least one hidden-state id")
        resolved = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"layer ids must be ints, got {i!r} in {ids}")
            if not -n_states <= i < n_states:
                raise ValueError(
                    f"layer id {i} out of range: valid ids are 0..{num_layers} (or {-n_states}..-1) "
                    f"for a model with {num_layers} layers"
                )
            resolved.append(i % n_states)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"duplicate layer ids in {ids} (resolved to {resolved} over 0..{num_layers})")
        return tuple(sorted(resolved))
    if stride is None:
        if start is not None:
            raise ValueError(f"start={start} only applies with stride; give stride too")
        return (num_layers,)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= num_layers:
        raise ValueError(f"stride must be an int in 1..{num_layers} (num_layers), got {stride!r}")
    start = stride - 1 if start is None else start
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= num_layers:
        raise ValueError(f"start must be an int in 0..{num_layers}, got {start!r}")
    return tuple(range(start, num_layers + 1, stride))


# Where the transformer blocks live, tried in order (text LLMs, HF composite VLMs, T5 encoders, GPT-2 style).
BLOCK_PATHS = (
    "layers",
    "model.layers",
    "language_model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "encoder.block",
    "block",
    "h",
    "transformer.h",
)


def _resolve(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module, path: str | None) -> nn.ModuleList:
    """The ``ModuleList`` of transformer blocks at dotted ``path``, or the first of ``BLOCK_PATHS`` that has one."""
    paths = (path,) if path is not None else BLOCK_PATHS
    for p in paths:
        blocks = _resolve(model, p)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}: tried attribute paths {list(paths)}; "
        "pass blocks_path='dotted.path.to.ModuleList'"
    )


class _StopForward(Exception):
    """Raised by the hook of the deepest tapped block so that deeper blocks never run."""


def tap_hidden_states(blocks: Sequence[nn.Module], layer_ids: Sequence[int], forward: Callable[[], Any],
                      stop_early: bool = True) -> dict[int, Tensor]:
    """Hidden states ``layer_ids`` of one ``forward()`` of the model that holds ``blocks``, taken with hooks:
    layer 0 is the first block's input, layer i block i's output (the first of a tuple output), and layer
    ``len(blocks)`` the forward's final-normed ``last_hidden_state``. ``stop_early``: the deepest tapped block ends
    the forward (no deeper block runs); otherwise the whole forward runs. Id -> (B, L, D) tensor."""
    wanted, last, got = set(layer_ids), len(blocks), {}
    deepest = max(wanted)

    def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got[0] = args[0] if args else kwargs["hidden_states"]
        if deepest == 0 and stop_early:
            raise _StopForward

    def block_output(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            got[layer] = output[0] if isinstance(output, (tuple, list)) else output
            if layer == deepest and stop_early:
                raise _StopForward

        return hook

    handles = [blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)] if 0 in wanted else []
    handles += [blocks[layer - 1].register_forward_hook(block_output(layer)) for layer in wanted - {0, last}]
    try:
        out = forward()
        if last in wanted:
            if getattr(out, "last_hidden_state", None) is None:
                raise ValueError(f"{type(out).__name__} holds no last_hidden_state; wrap a base model")
            got[last] = out.last_hidden_state
    except _StopForward:
        pass  # the deepest tapped block has run; nothing deeper is needed
    finally:
        for h in handles:
            h.remove()
    return got
