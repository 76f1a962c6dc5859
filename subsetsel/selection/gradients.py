"""Last-layer gradients of the cross-entropy loss, in closed form, via a forward hook.

For the model's final ``nn.Linear`` (``subsetsel.models.last_linear``) with input (embedding)
e (D,) and logits z = W e + b (C,), one sample's loss gradient is

    dL/dz = delta = softmax(z) - onehot(y)       dL/db = delta       dL/dW = delta e^T  (C, D)

and its gradient row is [dL/db | dL/dW flattened row-major] (C + C*D floats; C*D without bias).
The per-class-per-gradient row of a sample of class c keeps only its class's slice:
[delta_c | delta_c * e] (1 + D floats).

Every row is an outer product of two small factors, so the strategies keep the factors
(delta (n, C), e (n, D)) instead of the rows: `LastLayerAtoms` runs OMP on them without ever
materialising the n x C(1+D) matrix. `last_layer_gradients` materialises rows when wanted.
The model is run under ``torch.no_grad()`` in eval mode (its train/eval mode is restored), on
un-augmented inputs, in chunks; the model itself is never modified (the hook is removed after).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from subsetsel import memory
from subsetsel.engine.precision import Precision
from subsetsel.memory import GiB, free_memory, size_text  # noqa: F401  (re-exported)

CHUNK = 1024  # samples per forward pass


def final_linear(model: nn.Module) -> nn.Linear:
    """`subsetsel.models.last_linear` (imported lazily: subsetsel.models imports this package)."""
    from subsetsel.models import last_linear

    return last_linear(model)


class GradientMemoryError(MemoryError):
    """The gradient matrix or the OMP state would not fit the memory Grad-Match may use."""


@dataclass
class LastLayerFactors:
    """Per-sample factors of last-layer gradients for n samples.

    delta: float32 (n, C) softmax(z) - onehot(y) (or (n, 1): each sample's own-class entry).
    emb: float32 (n, D) input of the last linear.
    bias: whether the last linear has a bias (rows then start with delta).
    """

    delta: torch.Tensor
    emb: torch.Tensor
    bias: bool

    @property
    def num_classes(self) -> int:
        return int(self.delta.shape[1])

    def row_dim(self, per_gradient: bool = False) -> int:
        """Floats per gradient row: C(1+D) (C*D without bias); 1+D per class-slice row."""
        c = 1 if per_gradient else self.num_classes
        return c * (int(self.emb.shape[1]) + int(self.bias))

    def rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """float32 (m, C(1+D)) gradient rows [delta | delta (x) e] of samples idx (default all)."""
        delta = self.delta if idx is None else self.delta[idx]
        emb = self.emb if idx is None else self.emb[idx]
        return _rows(delta, emb, self.bias)

    def class_rows(self, y: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """float32 (m, 1+D) per-class-per-gradient rows [delta_y | delta_y e] for labels y (m,)."""
        delta = self.delta if idx is None else self.delta[idx]
        emb = self.emb if idx is None else self.emb[idx]
        return _rows(delta.gather(1, y.view(-1, 1)), emb, self.bias)

    def batch_mean_rows(self, batches: Sequence[torch.Tensor], mean: bool = True,
                        sizes: torch.Tensor | None = None) -> torch.Tensor:
        """float32 (m, C(1+D)): the mean gradient row of each batch (index tensors of rows);
        mean=False: the sums. sizes: divide by these (m,) instead of the batches' lengths."""
        m, c, d = len(batches), self.num_classes, int(self.emb.shape[1])
        out = torch.empty(m, self.row_dim(), dtype=torch.float32, device=self.delta.device)
        size = max((int(b.numel()) for b in batches), default=1)
        step = max(1, CHUNK * 16 // max(1, size))
        for start in range(0, m, step):
            group = batches[start : start + step]
            lengths = torch.tensor([b.numel() for b in group], device=self.delta.device)
            pad = pad_sequence([b.to(self.delta.device) for b in group], batch_first=True,
                               padding_value=-1)
            mask = (pad >= 0).unsqueeze(2).to(torch.float32)
            delta = self.delta[pad.clamp_min(0)] * mask  # (g, size, C)
            emb = self.emb[pad.clamp_min(0)]
            if sizes is not None:
                lengths = sizes[start : start + len(group)].to(self.delta.device)
            inv = 1.0 / lengths.clamp_min(1).to(torch.float32).view(-1, 1)
            if not mean:
                inv = torch.ones_like(inv)
            w = torch.bmm(delta.transpose(1, 2), emb).reshape(len(group), c * d) * inv
            block = out[start : start + len(group)]
            if self.bias:
                block[:, :c] = delta.sum(1) * inv
                block[:, c:] = w
            else:
                block[:] = w
        return out


def _rows(delta: torch.Tensor, emb: torch.Tensor, bias: bool) -> torch.Tensor:
    outer = (delta.unsqueeze(2) * emb.unsqueeze(1)).flatten(1)
    return torch.cat([delta, outer], 1) if bias else outer


@contextlib.contextmanager
def _hooked(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Eval mode, no grad, and a forward hook that records the last linear's input and output."""
    layer = final_linear(model)
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["emb"], seen["logits"] = inputs[0], output

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield seen
    finally:
        handle.remove()
        model.train(was_training)


Chunks = Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _factor_chunks(
    model: nn.Module, chunks: Chunks, precision: Precision | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(positions (m,), y (m,), delta (m, C), emb (m, D)) float32 for each (positions, x, y).
    The pass runs with `precision` (default float32) as `Precision.eval_pass` adapts it: on the
    CPU, conv nets in channels_last for the pass."""
    base = precision or Precision(final_linear(model).weight.device)
    with _hooked(model) as seen, base.eval_pass(model) as settings:
        for positions, x, y in chunks:
            settings.forward(model, x)
            emb, logits = seen["emb"], seen["logits"]
            if emb.dim() != 2 or logits.dim() != 2:
                raise ValueError(
                    "last-layer gradients need the final nn.Linear to map (B, D) to (B, C); got "
                    f"input {tuple(emb.shape)} and output {tuple(logits.shape)}"
                )
            delta = torch.softmax(logits.float(), 1)
            delta[torch.arange(y.shape[0], device=delta.device), y] -= 1.0
            yield positions, y, delta, emb.float()


def tensor_chunks(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK) -> Chunks:
    """(positions, x, y) chunks of in-memory tensors, in order."""
    for start in range(0, int(x.shape[0]), chunk):
        stop = min(start + chunk, int(x.shape[0]))
        yield torch.arange(start, stop, device=x.device), x[start:stop], y[start:stop]


def collect_factors(
    model: nn.Module, chunks: Chunks, n: int, *, class_slice: bool = False,
    storage: torch.device | None = None, precision: Precision | None = None,
) -> LastLayerFactors:
    """Factors (delta, e) of the last-layer gradients of n samples streamed as (positions, x, y)
    chunks, written in the order they come into preallocated (n, .) buffers on `storage`
    (default: the chunks' device; a CPU storage for a CUDA model is pinned). Row i of the
    result belongs to the i-th sample streamed (`eval_batches(indices)` streams `indices` in
    order).

    class_slice: keep only delta[i, y_i] (delta is then (n, 1): the per-class-per-gradient
    factors). Raises FloatingPointError when the model's outputs are not finite."""
    layer = final_linear(model)
    c = 1 if class_slice else layer.out_features
    delta = emb = finite = None
    seen = 0
    for _, y, d, e in _factor_chunks(model, chunks, precision):
        if delta is None or emb is None:
            where = storage if storage is not None else d.device
            pin = where.type == "cpu" and d.device.type == "cuda"
            delta = torch.empty(n, c, dtype=torch.float32, device=where, pin_memory=pin)
            emb = torch.empty(n, int(e.shape[1]), dtype=torch.float32, device=where,
                              pin_memory=pin)
        if class_slice:
            d = d.gather(1, y.view(-1, 1))
        ok = torch.isfinite(d).all() & torch.isfinite(e).all()  # no host sync per chunk
        finite = ok if finite is None else finite & ok
        m = int(y.shape[0])
        if seen + m > n:
            raise ValueError(f"gradient factors: more than the {n} samples expected")
        delta[seen : seen + m].copy_(d, non_blocking=True)
        emb[seen : seen + m].copy_(e, non_blocking=True)
        seen += m
    if delta is None or emb is None or seen != n:
        raise ValueError(f"gradient factors: {seen} samples read, {n} expected")
    if not bool(finite):
        raise FloatingPointError("the model's outputs are not finite (NaN or inf): no "
                                 "gradient-based selection is possible from it")
    return LastLayerFactors(delta, emb, layer.bias is not None)


def last_layer_factors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, class_slice: bool = False,
    chunk: int = CHUNK, precision: Precision | None = None,
) -> LastLayerFactors:
    """`collect_factors` over in-memory tensors x (n, ...), y (n,)."""
    return collect_factors(model, tensor_chunks(x, y, chunk), int(x.shape[0]),
                           class_slice=class_slice, precision=precision)


def last_layer_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    per_class: bool = False,
    batches: Sequence[torch.Tensor] | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Materialised last-layer gradient rows (float32, on x's device).

    Default: per-sample rows (n, C(1+D)). per_class: per-class-per-gradient rows (n, 1+D), each
    sample's own class slice. batches (index tensors of a partition): the mean row of each batch
    (m, C(1+D)). Per-sample variants are written chunk by chunk into one preallocated buffer.
    """
    if batches is not None:
        return last_layer_factors(model, x, y, chunk=chunk).batch_mean_rows(batches)
    layer = final_linear(model)
    bias = layer.bias is not None
    c = 1 if per_class else layer.out_features
    out = torch.empty(
        int(x.shape[0]), c * (layer.in_features + int(bias)), dtype=torch.float32, device=x.device
    )
    for positions, yc, delta, emb in _factor_chunks(model, tensor_chunks(x, y, chunk)):
        if per_class:
            delta = delta.gather(1, yc.view(-1, 1))
        out[positions] = _rows(delta, emb, bias)
    return out


class LastLayerAtoms:
    """OMP atoms given by gradient factors: atom i of problem p is [delta_i | delta_i (x) e_i].

    delta: float32 (B, n, c) (c = C, or 1 for class slices), emb: float32 (B, n, D), both zero
    on padding rows; counts int64 (B,); target: float64 (B, c(1+D)) (c*D without bias), the
    gradient sum to match. Each atom is kept as one row f_i = [delta_i | e_i | beta] (beta = 1
    with a bias, else 0), so atom i is delta_i (x) [e_i, beta] up to the order of its entries.
    The residual is kept in factor form, R = T - sum_s w_s delta_s [e_s, beta]^T (c x (D+1),
    float64, T the target as a matrix), so the correlations of all n atoms,
    <a_i, r> = delta_i . (R [e_i, beta]), cost one (n x (D+1)) by ((D+1) x c) product per step:
    O(n c D) per problem, independent of the support size, with no n x k matrix kept.
    Gram entries are <a_i, a_j> = (delta_i . delta_j)([e_i, beta] . [e_j, beta]): float64 for
    chosen atoms, float32 for a step's candidate pool (`gram`, which only ranks them).
    """

    def __init__(
        self, delta: torch.Tensor, emb: torch.Tensor, counts: torch.Tensor, target: torch.Tensor,
        bias: bool,
    ) -> None:
        self.batch, self.size, self.c = (int(s) for s in delta.shape)
        self.dim_e = int(emb.shape[2])
        self.device = delta.device
        self.bias = float(bias)
        beta = torch.full((self.batch, self.size, 1), self.bias, device=self.device)
        self._f = torch.cat([delta.float(), emb.float(), beta], 2)  # (B, n, c + D + 1)
        self.counts = torch.as_tensor(counts, dtype=torch.int64, device=self.device)
        self.target = target.to(device=self.device, dtype=torch.float64)
        c, nb = self.c, self.batch
        tb = self.target[:, :c] if bias else self.target.new_zeros(nb, c)
        tw = self.target[:, c * int(bias) :].reshape(nb, c, self.dim_e)
        self._t = torch.cat([tw, tb.unsqueeze(2)], 2)  # (B, c, D + 1)
        self._offsets = (torch.arange(nb, device=self.device) * self.size).unsqueeze(1)
        self._sf = self._sf32 = torch.empty(0)

    def target_sq_norm(self) -> torch.Tensor:
        return (self.target * self.target).sum(1)

    def sq_norms(self) -> torch.Tensor:
        sq = self._f * self._f
        return sq[:, :, : self.c].sum(2) * sq[:, :, self.c :].sum(2)

    def start(self, capacity: int) -> None:
        shape = (self.batch, capacity, self._f.shape[2])
        self._sf = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self._sf32 = torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _rows(self, j: torch.Tensor) -> torch.Tensor:
        """float32 (B, m, c + D + 1): the factor rows of atoms j (int64 (B, m))."""
        flat = self._f.view(-1, self._f.shape[2])
        return flat.index_select(0, (j + self._offsets).flatten()).view(*j.shape, -1)

    def add(self, t: int, j: torch.Tensor, take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, m = self.c, int(j.shape[1])
        new32 = self._rows(j) * take.unsqueeze(2)
        new = new32.double()
        self._sf[:, t : t + m] = new
        self._sf32[:, t : t + m] = new32
        support = self._sf[:, : t + m].transpose(1, 2)
        sd = torch.bmm(new[:, :, :c], support[:, :c])
        se = torch.bmm(new[:, :, c:], support[:, c:])
        proj = torch.bmm(new[:, :, c:], self._t.transpose(1, 2))  # (B, m, c)
        return sd * se, (new[:, :, :c] * proj).sum(2)

    def gram(self, t: int, j: torch.Tensor) -> torch.Tensor:
        """float64 (B, L, t + L) from float32 products: atoms j (B, L) against support slots
        0..t-1 and against each other (the optional `Atoms.gram`; ranks candidates only)."""
        c = self.c
        new = self._rows(j)
        other = torch.cat([self._sf32[:, :t], new], 1).transpose(1, 2)
        sd = torch.bmm(new[:, :, :c], other[:, :c])
        se = torch.bmm(new[:, :, c:], other[:, c:])
        return (sd * se).double()

    def correlations(self, t: int, w: torch.Tensor) -> torch.Tensor:
        c = self.c
        scaled = self._sf[:, :t, :c] * w.unsqueeze(2)  # (B, t, c): w_s delta_s
        r = self._t - torch.bmm(scaled.transpose(1, 2), self._sf[:, :t, c:])  # (B, c, D + 1)
        proj = torch.bmm(self._f[:, :, c:], r.float().transpose(1, 2))  # (B, n, c)
        return (proj * self._f[:, :, :c]).sum(2)


def check_memory(
    need: int, device: torch.device, share: float, what: str,
    alternatives: Sequence[tuple[str, int]] = (),
) -> None:
    """Raise GradientMemoryError (one line) if `need` bytes exceed `share` of free memory.

    alternatives: (CLI option text, bytes it would need); those that fit are suggested."""
    free = memory.free_memory(device)
    if free is None or need <= share * free:
        return
    fitting = [f"{option} (~{size_text(nbytes)})" for option, nbytes in alternatives
               if nbytes <= share * free]
    hint = (", ".join(fitting) + " or " if fitting else "") + "a smaller --fraction"
    raise GradientMemoryError(
        f"{what} needs about {size_text(need)} but only {share:g} of the {size_text(free)} free "
        f"on {device} may be used; try {hint}"
    )
