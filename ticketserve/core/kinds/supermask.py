"""Kind `supermask`: the pre-trained weights times a per-task binary mask, θ = θ0 ⊙ μ
(Radiya-Dixit & Wang; docs/concepts/methods.md#supermasks).

Payload per masked matrix (or the word embeddings): `<name>.mask` uint8 — the mask bits,
packed and compressed — and `<name>.codec` uint8[1], which codec the saver picked as the
smallest for that matrix (masks with 1–13 % zeros compress far below 1 bit/weight).
Optional `<name>.reference` int64[1] = r: the stored bits are the mask XNOR the magnitude
mask that drops the r smallest-|w| weights (the trainer's initial mask), so a mask trained
from a 50 % magnitude start costs its few flips, not the start's 50 % zeros. The reference
is recomputed from the backbone's own weights, which the fingerprint check pins.
Serving never changes the shared weights. A task that masks only dense matrices, none of
them beyond MAX_CORRECTED_SHARE, runs inside the shared forward of a mixed batch: the dense
product x·Wᵀ once for every example, then each example subtracts x·Cᵀ, C = W⊙(1−M) its
task's switched-off weights (core/sparse_correction: a CSR of the masked positions, values
read from W). Other tasks (embedding masks, dense masks) get their masked weights built on
demand (unpack → multiply) and substituted for their examples only
(`torch.func.functional_call`). Both forms live in one byte-bounded LRU per encoder, counted
at their serving size, rebuilt from the artifact on a miss.
"""

from __future__ import annotations

import lzma
import os
import threading
import weakref
import zlib
from collections import OrderedDict

import numpy as np
import torch
from bitarray import bitarray
from bitarray.util import sc_decode, sc_encode
from torch import nn

from ticketserve.core.backbone import dense_matrices, master
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import Kind, Tensors, register_kind
from ticketserve.core.routing import DEFAULT_SLOT, current
from ticketserve.core.sparse_correction import MaskedPositions, subtract

MASK, CODEC, REFERENCE = ".mask", ".codec", ".reference"
DEFAULT_CACHE_BYTES = int(os.environ.get("TICKETSERVE_MASK_CACHE_BYTES", 512 * 2**20))
MAX_CORRECTED_SHARE = 0.5  # beyond it, materialised weights; at 50 % corrections still ran 3.6× their speed (benchmarks/serving.md)


def _bits(packed: bytes, length: int) -> bitarray:
    bits = bitarray(endian="big")
    bits.frombytes(packed)
    del bits[length:]
    return bits


# codec id → (name, encode(packed bytes, bit length) → bytes, decode(bytes, bit length) → packed bytes)
CODECS = {
    0: ("raw", lambda packed, n: packed, lambda data, n: data),
    1: ("zlib", lambda packed, n: zlib.compress(packed, 9), lambda data, n: zlib.decompress(data)),
    2: ("lzma", lambda packed, n: lzma.compress(packed), lambda data, n: lzma.decompress(data)),
    # bitarray's compressed-sparse format over the inverted mask: the zeros are the sparse part
    3: ("sparse-zeros", lambda packed, n: sc_encode(~_bits(packed, n)), lambda data, n: (~sc_decode(data)).tobytes()),
}


def magnitude_mask(weight: torch.Tensor, dropped: int, cut: tuple[float, int] | None = None) -> torch.Tensor:
    """Keep-mask without the `dropped` smallest-|w| weights, ties broken by position (what a
    stable argsort would give). `cut` (from `magnitude_cut`) skips the kthvalue: serving
    rebuilds the same reference for every task trained from it."""
    magnitude = _magnitude(weight)
    threshold, tied_dropped = cut or magnitude_cut(weight, dropped)
    keep = magnitude > threshold
    keep[(magnitude == threshold).nonzero().flatten()[tied_dropped:]] = True
    return keep.reshape(weight.shape)


def magnitude_cut(weight: torch.Tensor, dropped: int) -> tuple[float, int]:
    """The threshold and how many weights exactly at it are dropped (the first ones), in O(n)
    with one kthvalue."""
    if dropped <= 0:
        return -1.0, 0
    magnitude = _magnitude(weight)
    threshold = magnitude.kthvalue(dropped).values
    return float(threshold), dropped - int((magnitude < threshold).sum())


def _magnitude(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs().flatten().cpu()


def encode_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a boolean mask and compress it with whichever codec is smallest for it."""
    n = mask.numel()
    packed = np.packbits(mask.detach().cpu().flatten().numpy().astype(np.uint8)).tobytes()
    codec, data = min(((cid, enc(packed, n)) for cid, (_, enc, _) in CODECS.items()), key=lambda c: len(c[1]))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor([codec], dtype=torch.uint8)


def decode_mask(data: torch.Tensor, codec: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    n = int(np.prod(shape))
    codec_id = int(codec[0])
    if codec_id not in CODECS:
        raise CorruptArtifact(f"{what}: unknown mask codec {codec_id}")
    try:
        packed = CODECS[codec_id][2](data.numpy().tobytes(), n)
    except Exception as exc:  # zlib.error, lzma.LZMAError, ValueError from bitarray
        raise CorruptArtifact(f"{what}: mask does not decode ({exc})") from exc
    if len(packed) != (n + 7) // 8:
        raise CorruptArtifact(f"{what}: mask holds {len(packed) * 8} bits, the weight has {n}")
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def encode_masks(masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None,
                 dropped: dict[str, int] | None = None) -> Tensors:
    """Encode each mask as is, or — where `dropped` names its start — relative to that
    magnitude mask, whichever is smaller."""
    tensors: Tensors = {}
    for name, mask in masks.items():
        data, codec = encode_mask(mask)
        count = (dropped or {}).get(name)
        if count:
            relative = encode_mask(~(mask.cpu() ^ magnitude_mask(weights[name], count)))
            if relative[0].numel() < data.numel():
                (data, codec), tensors[name + REFERENCE] = relative, torch.tensor([count], dtype=torch.int64)
        tensors[name + MASK], tensors[name + CODEC] = data, codec
    return tensors


def decode_masks(tensors: Tensors, weights: dict[str, torch.Tensor], cuts: dict | None = None) -> dict[str, torch.Tensor]:
    """The masks; `cuts` memoises each reference's magnitude cut by (name, dropped)."""
    cuts = {} if cuts is None else cuts
    masks = {}
    for name in masked_names(tensors):
        stored = decode_mask(tensors[name + MASK], tensors[name + CODEC], weights[name].shape, name)
        if name + REFERENCE in tensors:
            dropped = int(tensors[name + REFERENCE][0])
            if not 0 < dropped <= weights[name].numel():
                raise CorruptArtifact(f"{name}: reference drops {dropped} of {weights[name].numel()} weights")
            if (name, dropped) not in cuts:
                cuts[name, dropped] = magnitude_cut(weights[name], dropped)
            stored = ~stored ^ magnitude_mask(weights[name], dropped, cuts[name, dropped])
        masks[name] = stored
    return masks


def masked_names(tensors: Tensors) -> list[str]:
    return sorted(key.removesuffix(MASK) for key in tensors if key.endswith(MASK))


class MaskCache:
    """The serving form of hot tasks (masked weights, or masked positions), least recently used
    evicted past `max_bytes`."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = DEFAULT_CACHE_BYTES if max_bytes is None else max_bytes
        self.entries: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.bytes = self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()
        self.cuts: dict[tuple[str, int], tuple[float, int]] = {}  # magnitude references of the shared weights

    @staticmethod
    def size(entry: dict[str, torch.Tensor | MaskedPositions]) -> int:
        return sum(value.nbytes for value in entry.values())

    def get(self, slot: int, build) -> dict:
        with self.lock:
            if slot in self.entries:
                self.hits += 1
                self.entries.move_to_end(slot)
                return self.entries[slot]
            self.misses += 1
        weights = build()  # outside the lock: unpacking is the slow part
        with self.lock:
            self.entries[slot] = weights
            self.bytes += self.size(weights)
            while self.bytes > self.max_bytes and len(self.entries) > 1:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= self.size(evicted)
                self.evictions += 1
        return weights

    def drop(self, slot: int) -> None:
        with self.lock:
            if slot in self.entries:
                self.bytes -= self.size(self.entries.pop(slot))


_CACHES: weakref.WeakKeyDictionary[nn.Module, MaskCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def cache_for(encoder: nn.Module) -> MaskCache:
    """One cache per shared encoder (tasks of a backbone share its memory budget), kept here,
    not on the encoder: it goes when the encoder goes."""
    with _CACHES_LOCK:
        if encoder not in _CACHES:
            _CACHES[encoder] = MaskCache()
        return _CACHES[encoder]


class MaskedEncoder(nn.Module):
    """Runs the shared encoder with one task's masked weights substituted for its own."""

    def __init__(self, base: nn.Module, slot: int, tensors: Tensors):
        super().__init__()
        self.base = [base]  # a list: not registered as a submodule (it is shared, not owned)
        self.slot = slot
        self.tensors = tensors
        self.config = base.config

    def masked_weights(self) -> dict[str, torch.Tensor]:
        base = self.base[0]
        params = dict(base.named_parameters())

        def build() -> dict[str, torch.Tensor]:
            weights = {n: params[f"{n}.weight"].detach() for n in masked_names(self.tensors)}
            return {f"{n}.weight": weights[n] * m.to(weights[n].device, weights[n].dtype)
                    for n, m in exact_masks(base, self.tensors).items()}

        return cache_for(base).get(self.slot, build)

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.base[0], self.masked_weights(), args, kwargs, strict=False)


class Corrections:
    """The supermask tasks of one encoder that run as corrections of its shared dense layers: a
    forward hook on each matrix subtracts, per example, its task's masked weights' product."""

    def __init__(self, encoder: nn.Module):
        self.encoder = weakref.ref(encoder)
        self.sources: dict[int, Tensors] = {}  # slot → the artifact's tensors (rebuilt from on a cache miss)

    def positions(self, slot: int) -> dict[str, MaskedPositions]:
        encoder = self.encoder()
        return cache_for(encoder).get(slot, lambda: masked_positions(encoder, exact_masks(encoder, self.sources[slot])))

    def hook(self, name: str):
        def subtract_masked(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.sources:
                return
            routing = current()
            slots = [DEFAULT_SLOT] * output.shape[0] if routing is None else routing.slot_list
            index: dict[int, int] = {}
            found: list[MaskedPositions] = []
            for slot in dict.fromkeys(slots):
                masked = self.positions(slot).get(name) if slot in self.sources else None
                if masked is not None and masked.nnz:
                    index[slot] = len(found)
                    found.append(masked)
            if found:
                subtract(output, args[0], module.weight, found, [index.get(slot, -1) for slot in slots],
                         None if routing is None else routing.lengths)

        return subtract_masked


_CORRECTIONS: weakref.WeakKeyDictionary[nn.Module, Corrections] = weakref.WeakKeyDictionary()


def corrections_for(encoder: nn.Module) -> Corrections:
    """The encoder's corrections, its hooks installed on first use (kept on the layer when
    another kind wraps it later, as row deltas copy a layer's hooks)."""
    with _CACHES_LOCK:
        if encoder not in _CORRECTIONS:
            corrections = _CORRECTIONS[encoder] = Corrections(encoder)
            for name, linear in dense_matrices(encoder).items():
                linear.register_forward_hook(corrections.hook(name))
        return _CORRECTIONS[encoder]


# the masks `validate` decoded last, for the `attach` that follows it: taken once, and only by
# the very same tensors on the same weights (one entry: a load between the two decodes again)
_VALIDATED: list[tuple[nn.Module, Tensors, dict[str, torch.Tensor]]] = []
_VALIDATED_LOCK = threading.Lock()


def _decode_exact(encoder: nn.Module, tensors: Tensors) -> dict[str, torch.Tensor]:
    exact = dict(master(encoder).named_parameters())
    return decode_masks(tensors, {n: exact[f"{n}.weight"] for n in masked_names(tensors)}, cache_for(encoder).cuts)


def exact_masks(encoder: nn.Module, tensors: Tensors) -> dict[str, torch.Tensor]:
    """A task's masks, references decoded against the float32 weights."""
    with _VALIDATED_LOCK:
        if _VALIDATED:
            weights, seen, masks = _VALIDATED[0]
            if weights is master(encoder) and seen.keys() == tensors.keys() and all(
                    seen[k] is tensors[k] for k in seen):
                _VALIDATED.clear()
                return masks
    return _decode_exact(encoder, tensors)


def masked_positions(encoder: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, MaskedPositions]:
    device = next(encoder.parameters()).device
    return {n: MaskedPositions.of(m).to(device) for n, m in masks.items()}


def correctable(encoder: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, MaskedPositions] | None:
    """The task's masked positions, if it runs as a correction: only dense matrices masked,
    none beyond MAX_CORRECTED_SHARE; else None."""
    dense = dense_matrices(encoder)
    if not all(n in dense for n in masks):
        return None
    positions = masked_positions(encoder, masks)
    fits = all(p.nnz <= MAX_CORRECTED_SHARE * masks[n].numel() for n, p in positions.items())
    return positions if fits else None


@register_kind
class SupermaskKind(Kind):
    name = "supermask"

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        params = dict(encoder.named_parameters())
        names = masked_names(tensors)
        expected = {f"{n}{suffix}" for n in names for suffix in (MASK, CODEC)}
        if not names or not expected <= set(tensors) <= expected | {n + REFERENCE for n in names}:
            raise CorruptArtifact("a supermask holds `<matrix>.mask` and `<matrix>.codec` (and optionally "
                                  "`<matrix>.reference`) per masked weight")
        for name in names:
            if f"{name}.weight" not in params:
                raise CorruptArtifact(f"supermask names {name!r}, which this backbone does not have")
            mask, codec = tensors[name + MASK], tensors[name + CODEC]
            if mask.dtype != torch.uint8 or mask.dim() != 1 or codec.dtype != torch.uint8 or codec.shape != (1,):
                raise CorruptArtifact(f"supermask {name}: mask must be uint8 bytes with a 1-byte codec id")
            reference = tensors.get(name + REFERENCE)
            if reference is not None and (reference.dtype != torch.int64 or reference.shape != (1,)):
                raise CorruptArtifact(f"supermask {name}: reference must be one int64 count")
        masks = _decode_exact(encoder, tensors)  # fail now, not later
        with _VALIDATED_LOCK:
            _VALIDATED[:] = [(master(encoder), dict(tensors), masks)]

    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        positions = correctable(encoder, exact_masks(encoder, tensors))
        if positions is None:
            return MaskedEncoder(encoder, slot, tensors)
        corrections = corrections_for(encoder)
        cache_for(encoder).get(slot, lambda: positions)  # built at load, not in a batch
        corrections.sources[slot] = tensors
        return encoder

    def detach(self, encoder: nn.Module, slot: int) -> None:
        if encoder in _CORRECTIONS:
            _CORRECTIONS[encoder].sources.pop(slot, None)
        cache_for(encoder).drop(slot)

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        params = dict(encoder.named_parameters())
        masks = decode_masks(tensors, {n: params[f"{n}.weight"] for n in masked_names(tensors)}, cache_for(encoder).cuts)
        return {f"{n}.weight": params[f"{n}.weight"].detach() * m for n, m in masks.items()}
