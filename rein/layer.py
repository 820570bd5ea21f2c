"""ReinLayer: the Rein module users put into their backbones.

A drop-in for the reference ``Reins`` / ``LoRAReins``: same constructor arguments,
same parameter names and state_dict keys, same initialisation (in the same order, so
the same seed gives the same weights), same call. ``fused=True`` runs the Triton
kernels where they can run and otherwise falls back, once saying so, to the
reference path.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings

import torch
import torch.nn as nn
from torch import Tensor

import rein_kernels
from rein_kernels import check_inputs, rein_layer_reference, rein_queries_reference

_warned_fallback: set[str] = set()

# The fused path's operands of the ReinLayers whose ``prepared()`` block is open in this
# thread (or task): {id(layer): {(compute dtype, grad mode): operands}}. A context variable,
# so threads sharing a module never see each other's blocks.
_PREPARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rein_prepared", default=None)


def _saved_tensor_hooks_active() -> bool:
    """True inside activation checkpointing (non-reentrant: torch.utils.checkpoint, timm's,
    checkpoint_wrapper) or other saved-tensor hooks. A checkpointed block's ops are replayed
    in the backward, outside any ``prepared()`` block, and must repeat the forward's: there
    every layer forms its own operands, in the forward and in the replay alike. (torch's
    own checkpoint code asks the same private question.)"""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _warn_fallback_once(device: torch.device) -> None:
    key = str(device.type)
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(
            f"rein.ReinLayer(fused=True): no Triton kernel path on {device.type} "
            "(kernels need a CUDA GPU, or TRITON_INTERPRET=1 on CPU without bf16); "
            "using the pure-PyTorch reference instead",
            RuntimeWarning,
            stacklevel=3,
        )


class _ProductOutsideAutocast(torch.autograd.Function):
    """A @ B with autocast off in the forward and in the backward alike: a backward run
    inside an autocast region would otherwise recast its products (what
    ``torch.amp.custom_bwd`` does, for the device of the inputs)."""

    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor) -> Tensor:
        ctx.save_for_backward(A, B)
        with torch.autocast(A.device.type, enabled=False):
            return A @ B

    @staticmethod
    def backward(ctx, g: Tensor):
        A, B = ctx.saved_tensors
        with torch.autocast(g.device.type, enabled=False):
            return g @ B.mT, A.mT @ g


class ReinLayer(nn.Module):
    """One Rein module shared by all ``num_layers`` blocks of a backbone.

    Parameters (state_dict keys): ``learnable_tokens`` [L, m, C] (or
    ``learnable_tokens_a`` [L, m, r] and ``learnable_tokens_b`` [L, r, C] with
    ``lora_dim=r``), ``scale`` (absent with ``zero_mlp_delta_f``, where it is 1.0),
    ``mlp_token2feat``, ``mlp_delta_f``, ``transform``, ``merge``.

    Call as ``layer(x, layer_index, batch_first=False, has_cls_token=True)``;
    ``num_prefix_tokens`` overrides ``has_cls_token`` for backbones with register
    tokens. ``return_auto(feats)`` returns ``(feats, queries)`` when
    ``link_token_to_query``, else ``feats``. ``fused_active`` says whether the last call
    ran the fused kernels.
    """

    # a class attribute, so modules pickled before it existed load with it
    _fused_active: bool | None = None

    def __init__(
        self,
        num_layers: int,
        embed_dims: int,
        patch_size: int,
        query_dims: int = 256,
        token_length: int = 100,
        use_softmax: bool = True,
        link_token_to_query: bool = True,
        scale_init: float = 0.001,
        zero_mlp_delta_f: bool = False,
        lora_dim: int | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        for name, v in [
            ("num_layers", num_layers), ("embed_dims", embed_dims), ("patch_size", patch_size),
            ("query_dims", query_dims), ("token_length", token_length),
        ]:
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if lora_dim is not None and (not isinstance(lora_dim, int) or lora_dim < 1):
            raise ValueError(f"lora_dim must be None or a positive int, got {lora_dim!r}")
        self.num_layers = num_layers
        self.embed_dims = embed_dims
        self.patch_size = patch_size
        self.query_dims = query_dims
        self.token_length = token_length
        self.link_token_to_query = link_token_to_query
        self.scale_init = scale_init
        self.use_softmax = use_softmax
        self.zero_mlp_delta_f = zero_mlp_delta_f
        self.lora_dim = lora_dim
        self.fused = fused

        # The reference's creation and initialisation order, so a seed gives its weights.
        C, p = embed_dims, patch_size
        self.learnable_tokens = nn.Parameter(torch.empty(num_layers, token_length, C))
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.mlp_token2feat = nn.Linear(C, C)
        self.mlp_delta_f = nn.Linear(C, C)
        v = math.sqrt(6.0 / float(3 * p * p + C))
        nn.init.uniform_(self.learnable_tokens.data, -v, v)
        nn.init.kaiming_uniform_(self.mlp_delta_f.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mlp_token2feat.weight, a=math.sqrt(5))
        self.transform = nn.Linear(C, query_dims)
        self.merge = nn.Linear(query_dims * 3, query_dims)
        if not link_token_to_query:
            # Kept for the reference's state_dict keys, but unused: frozen so that DDP
            # needs no find_unused_parameters.
            self.transform.requires_grad_(False)
            self.merge.requires_grad_(False)
        if zero_mlp_delta_f:
            del self.scale
            self.scale = 1.0
            nn.init.zeros_(self.mlp_delta_f.weight)
            nn.init.zeros_(self.mlp_delta_f.bias)
        if lora_dim is not None:
            del self.learnable_tokens
            self.learnable_tokens_a = nn.Parameter(torch.empty(num_layers, token_length, lora_dim))
            self.learnable_tokens_b = nn.Parameter(torch.empty(num_layers, lora_dim, C))
            v = math.sqrt(6.0 / float(3 * p * p + (C * lora_dim) ** 0.5))
            nn.init.uniform_(self.learnable_tokens_a.data, -v, v)
            nn.init.uniform_(self.learnable_tokens_b.data, -v, v)

    @property
    def fused_active(self) -> bool | None:
        """Whether the last forward ran the fused kernels: False when it ran the reference,
        because ``fused=False`` or because the kernels cannot run on that input (no CUDA
        GPU and no ``TRITON_INTERPRET=1``, or bf16 in the interpreter; ``fused=True`` then
        warns once per process); None before the first forward."""
        return self._fused_active

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, embed_dims={self.embed_dims}, "
            f"token_length={self.token_length}, lora_dim={self.lora_dim}, "
            f"use_softmax={self.use_softmax}, fused={self.fused}"
        )

    def get_tokens(self, layer: int) -> Tensor:
        """Tokens of one layer [m, C], or of all layers [L, m, C] for ``layer=-1``."""
        if layer != -1 and not (isinstance(layer, int) and 0 <= layer < self.num_layers):
            raise IndexError(f"layer index {layer!r} out of range [0, {self.num_layers}) (or -1 for all)")
        if self.lora_dim is None:
            return self.learnable_tokens if layer == -1 else self.learnable_tokens[layer]
        if layer == -1:
            return self.learnable_tokens_a @ self.learnable_tokens_b
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def _token_params(self) -> list[Tensor]:
        if self.lora_dim is None:
            return [self.learnable_tokens]
        return [self.learnable_tokens_a, self.learnable_tokens_b]

    def _mlp_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_t, b_t, W_d, b_d): mlp_token2feat's and mlp_delta_f's weights and biases."""
        return (self.mlp_token2feat.weight, self.mlp_token2feat.bias,
                self.mlp_delta_f.weight, self.mlp_delta_f.bias)

    @contextlib.contextmanager
    def prepared(self):
        """Open around one forward pass of the backbone (``rein.ReinBackbone`` does): the
        fused path then casts the parameters and forms U = (T[1:] W_t^T + b_t) W_d^T for all
        layers at its first call, as one batched GEMM, and every layer takes its slice,
        instead of each layer's call doing that work again (per layer: five casts and two
        GEMMs fewer, and their backward; one cast of W_d shared by all layers, as autocast
        shares the reference's). Results are those of the unprepared calls up to rounding.

        One forward pass per ``with``: the operands' autograd graph is shared by its layers,
        so a second forward inside the same block could not be backpropagated separately.
        Inside activation checkpointing (saved-tensor hooks) and torch.compile each call
        forms its own operands as without the block. The block belongs to the thread that
        opened it; blocks nest (the inner one forms its own operands)."""
        outer = _PREPARED.get()
        token = _PREPARED.set({**(outer or {}), id(self): {}})
        try:
            yield self
        finally:
            _PREPARED.reset(token)

    def _kernel_tokens(self, layer: int) -> Tensor:
        """The tokens the kernels take. v4 takes them in the parameters' dtype: LoRA's
        product A B then runs outside autocast (its backward too, wherever that runs), and
        the kernels round it to the compute dtype where autocast's matmul would have (one
        rounding of the fp32-accumulated product either way), with no casts of A and B and
        their gradients."""
        if rein_kernels.KERNELS == "v3" or self.lora_dim is None:
            return self.get_tokens(layer)
        A, B = self.learnable_tokens_a, self.learnable_tokens_b
        return _ProductOutsideAutocast.apply(A, B) if layer == -1 else _ProductOutsideAutocast.apply(A[layer], B[layer])

    def layer_operands(self, cdtype: torch.dtype) -> list[tuple[Tensor, ...]]:
        """Every layer's operands for the kernels, formed at once (one batched GEMM for U and
        one cast or scaling of each shared parameter, with their backward once per pass):
        ``layer_operands(cdtype)[i]`` is what layer i's call would form for itself. Tokens
        and U are sliced by ``unbind``, the layer-shared ones taken as views of one
        expanded tensor (``expand(L, ...).unbind(0)``), so that their gradients meet in one
        stack and one sum at the end of the backward instead of an accumulating add per
        layer (v3 keeps its [C, C] W_d shared and accumulating, as it was measured).
        ``rein.ReinBackbone`` binds these to its blocks for one forward pass; ``prepared()``
        does the same for a backbone of your own. Plain tensor operations: torch.compile
        traces them, so a compiled forward forms them once too."""
        L, v3 = self.num_layers, rein_kernels.KERNELS == "v3"
        parts = [t.unbind(0) if t.dim() == 3 else t if (v3 and t.dim() == 2) else t.expand(L, *t.shape).unbind(0)
                 for t in self._prepare(-1, cdtype)]
        return [tuple(t if isinstance(t, Tensor) else t[i] for t in parts) for i in range(L)]

    def _operands(self, layer: int, cdtype: torch.dtype) -> tuple[Tensor, ...]:
        """One layer's operands for the kernels: its slice of ``layer_operands`` inside
        ``prepared()``, else formed for this call alone (``rein_kernels.prepare``)."""
        shared = None
        if not torch.compiler.is_compiling() and not _saved_tensor_hooks_active():
            shared = (_PREPARED.get() or {}).get(id(self))
        if shared is None:
            return self._prepare(layer, cdtype)
        key = (rein_kernels.KERNELS, cdtype, torch.is_grad_enabled())
        if key not in shared:
            shared[key] = self.layer_operands(cdtype)
        return shared[key][layer]

    def _prepare(self, layer: int, cdtype: torch.dtype) -> tuple[Tensor, ...]:
        """``rein_kernels.prepare`` of layer ``layer``'s tokens (-1: all layers'), the MLP
        and the scale (none with ``zero_mlp_delta_f``)."""
        scale = None if self.zero_mlp_delta_f else self.scale
        return rein_kernels.prepare(self._kernel_tokens(layer), *self._mlp_params(), scale, cdtype)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the layer's GEMMs run in for input x: autocast's, else x's and the
        parameters' (which must then agree)."""
        return rein_kernels.compute_dtype(x, [*self._token_params(), *self._mlp_params()])

    def fused_available(self, x: Tensor, cdtype: torch.dtype) -> bool:
        """Whether a call on x runs the fused kernels (``fused`` and a device they run on)."""
        return self.fused and rein_kernels.is_available(x, cdtype)

    def apply_operands(self, x: Tensor, operands: tuple[Tensor, ...], cdtype: torch.dtype,
                       batch_first: bool = False, num_prefix_tokens: int = 1) -> Tensor:
        """The fused layer on one layer's operands from ``layer_operands(cdtype)``, formed
        for x's compute dtype (``compute_dtype(x)``) on a device where ``fused_available``."""
        check_inputs(x, self.mlp_delta_f.weight, num_prefix_tokens, batch_first)
        return self._fused(x, operands, cdtype, batch_first, num_prefix_tokens)

    def apply_tokens(self, x: Tensor, T: Tensor, batch_first: bool = False, num_prefix_tokens: int = 1) -> Tensor:
        """The reference layer with one layer's tokens T [m, C] given (a slice of
        ``get_tokens(-1)``): what ``forward`` computes with ``fused=False``."""
        check_inputs(x, T, num_prefix_tokens, batch_first)
        return self._reference(x, T, batch_first, num_prefix_tokens)

    def _fused(self, x, operands, cdtype, batch_first, num_prefix_tokens) -> Tensor:
        self._fused_active = True
        return rein_kernels.apply_fused(x, operands, cdtype, batch_first, num_prefix_tokens, self.use_softmax)

    def _reference(self, x, T, batch_first, num_prefix_tokens) -> Tensor:
        self._fused_active = False
        return rein_layer_reference(x, T, *self._mlp_params(), self.scale, batch_first=batch_first,
                                    num_prefix_tokens=num_prefix_tokens, use_softmax=self.use_softmax)

    def forward(
        self,
        x: Tensor,
        layer: int,
        batch_first: bool = False,
        has_cls_token: bool = True,
        num_prefix_tokens: int | None = None,
    ) -> Tensor:
        if num_prefix_tokens is None:
            num_prefix_tokens = 1 if has_cls_token else 0
        if not (isinstance(layer, int) and 0 <= layer < self.num_layers):
            raise IndexError(f"layer index {layer!r} out of range [0, {self.num_layers})")
        W = self._mlp_params()
        check_inputs(x, W[2], num_prefix_tokens, batch_first)  # W_d [C, C]: C and the device
        cdtype = self.compute_dtype(x)
        if self.fused:
            if rein_kernels.is_available(x, cdtype):
                return self._fused(x, self._operands(layer, cdtype), cdtype, batch_first, num_prefix_tokens)
            _warn_fallback_once(x.device)
        return self._reference(x, self.get_tokens(layer), batch_first, num_prefix_tokens)

    def queries(self) -> Tensor:
        """Queries [m, Q] for a query-based head, from the tokens of all layers."""
        return rein_queries_reference(
            self.get_tokens(-1), self.transform.weight, self.transform.bias,
            self.merge.weight, self.merge.bias,
        )

    def return_auto(self, feats):
        if self.link_token_to_query:
            return feats, self.queries()
        return feats


class Reins(ReinLayer):
    """The reference ``Reins`` signature (full-rank tokens)."""

    def __init__(
        self,
        num_layers: int,
        embed_dims: int,
        patch_size: int,
        query_dims: int = 256,
        token_length: int = 100,
        use_softmax: bool = True,
        link_token_to_query: bool = True,
        scale_init: float = 0.001,
        zero_mlp_delta_f: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__(
            num_layers, embed_dims, patch_size, query_dims, token_length, use_softmax,
            link_token_to_query, scale_init, zero_mlp_delta_f, lora_dim=None, fused=fused,
        )


class LoRAReins(ReinLayer):
    """The reference ``LoRAReins`` signature: tokens T_l = A_l B_l of rank ``lora_dim``."""

    def __init__(self, lora_dim: int = 16, **kwargs) -> None:
        super().__init__(lora_dim=lora_dim, **kwargs)
