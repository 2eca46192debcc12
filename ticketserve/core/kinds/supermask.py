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
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from bitarray import bitarray
from bitarray.util import sc_decode, sc_encode
from torch import nn

from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import Kind, Tensors, register_kind
from ticketserve.core.routing import DEFAULT_SLOT, Routing
from ticketserve.core.shared_encoder import SharedEncoder, Terms
from ticketserve.core.sparse_correction import MaskedPositions, subtract

MASK, CODEC, REFERENCE = ".mask", ".codec", ".reference"
DEFAULT_CACHE_BYTES = int(os.environ.get("TICKETSERVE_MASK_CACHE_BYTES", 512 * 2**20))
MAX_CORRECTED_SHARE = 0.5  # beyond it, materialised weights; at 50 % corrections still ran 3.6× their speed (benchmarks/system/serving.md)


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


CUTS = "_ticketserve_cuts"  # the attribute of a weight that memoises its references' cuts by dropped count


def reference_cut(weight: torch.Tensor, dropped: int) -> tuple[float, int]:
    """`magnitude_cut`, memoised on the weight itself (it goes with it): every task trained
    from the same reference shares one kthvalue."""
    cuts = getattr(weight, CUTS, None)
    if cuts is None:
        cuts = {}
        setattr(weight, CUTS, cuts)
    if dropped not in cuts:
        cuts[dropped] = magnitude_cut(weight, dropped)
    return cuts[dropped]


def decode_masks(tensors: Tensors, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = {}
    for name in masked_names(tensors):
        stored = decode_mask(tensors[name + MASK], tensors[name + CODEC], weights[name].shape, name)
        if name + REFERENCE in tensors:
            dropped = int(tensors[name + REFERENCE][0])
            if not 0 < dropped <= weights[name].numel():
                raise CorruptArtifact(f"{name}: reference drops {dropped} of {weights[name].numel()} weights")
            stored = ~stored ^ magnitude_mask(weights[name], dropped, reference_cut(weights[name], dropped))
        masks[name] = stored
    return masks


def masks_for(tensors: Tensors, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A payload's masks, references decoded against `encoder`'s weights (the float32 ones)."""
    params = dict(encoder.named_parameters())
    return decode_masks(tensors, {n: params[f"{n}.weight"] for n in masked_names(tensors)})


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


@dataclass
class Prepared:
    """A checked supermask payload and the masks checking it decoded (for the first build)."""

    tensors: Tensors
    masks: dict[str, torch.Tensor]


class Supermasks(Terms):
    """The supermask tasks of one shared encoder: one byte-bounded cache of their serving forms
    (tasks of a backbone share its memory budget), and the tasks that run as corrections of
    its dense matrices — per example, the product of its task's switched-off weights is
    subtracted from the shared product."""

    def __init__(self, shared: SharedEncoder):
        self.shared = shared
        self.cache = MaskCache()
        self.sources: dict[int, Tensors] = {}  # corrected slot → the artifact's tensors (rebuilt from on a cache miss)

    def positions(self, slot: int) -> dict[str, MaskedPositions]:
        shared = self.shared
        return self.cache.get(slot, lambda: masked_positions(shared, masks_for(self.sources[slot], shared.master)))

    def add(self, matrix: str, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        if not self.sources:
            return y
        slots = [DEFAULT_SLOT] * y.shape[0] if routing is None else routing.slot_list
        index: dict[int, int] = {}
        found: list[MaskedPositions] = []
        for slot in dict.fromkeys(slots):
            masked = self.positions(slot).get(matrix) if slot in self.sources else None
            if masked is not None and masked.nnz:
                index[slot] = len(found)
                found.append(masked)
        if found:
            subtract(y, x, layer.weight, found, [index.get(slot, -1) for slot in slots],
                     None if routing is None else routing.lengths)
        return y


def masks_on(shared: SharedEncoder) -> Supermasks:
    return shared.state(SupermaskKind.name, Supermasks)


class MaskedEncoder(nn.Module):
    """Runs the shared encoder with one task's masked weights substituted for its own."""

    def __init__(self, shared: SharedEncoder, slot: int, tensors: Tensors):
        super().__init__()
        self.shared = [shared]  # a list: not registered as a submodule (it is shared, not owned)
        self.slot = slot
        self.tensors = tensors
        self.config = shared.config

    def masked_weights(self, masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        shared = self.shared[0]

        def build() -> dict[str, torch.Tensor]:  # on a cache miss only
            params = dict(shared.module.named_parameters())
            weights = {n: params[f"{n}.weight"].detach() for n in masked_names(self.tensors)}
            return {f"{n}.weight": weights[n] * m.to(weights[n].device, weights[n].dtype)
                    for n, m in (masks or masks_for(self.tensors, shared.master)).items()}

        return masks_on(shared).cache.get(self.slot, build)

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.shared[0].module, self.masked_weights(), args, kwargs, strict=False)


def masked_positions(shared: SharedEncoder, masks: dict[str, torch.Tensor]) -> dict[str, MaskedPositions]:
    return {n: MaskedPositions.of(m).to(shared.device) for n, m in masks.items()}


def correctable(shared: SharedEncoder, masks: dict[str, torch.Tensor]) -> dict[str, MaskedPositions] | None:
    """The task's masked positions, if it runs as a correction: only dense matrices masked,
    none beyond MAX_CORRECTED_SHARE; else None."""
    if not all(n in shared.matrices for n in masks):
        return None
    positions = masked_positions(shared, masks)
    fits = all(p.nnz <= MAX_CORRECTED_SHARE * masks[n].numel() for n, p in positions.items())
    return positions if fits else None


@register_kind
class SupermaskKind(Kind):
    name = "supermask"

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        self.prepare(tensors, encoder)

    def prepare(self, tensors: Tensors, encoder: nn.Module) -> Prepared:
        """Checked, and decoded against the float32 `encoder` (a mask that does not decode fails now)."""
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
        return Prepared(tensors, masks_for(tensors, encoder))

    def attach(self, shared: SharedEncoder, slot: int, prepared: Prepared) -> nn.Module:
        positions = correctable(shared, prepared.masks)
        state = masks_on(shared)
        if positions is None:
            encoder = MaskedEncoder(shared, slot, prepared.tensors)
            encoder.masked_weights(prepared.masks)  # built at load, not in a batch
            return encoder
        state.cache.get(slot, lambda: positions)  # built at load, not in a batch
        state.sources[slot] = prepared.tensors
        return shared.module

    def detach(self, shared: SharedEncoder, slot: int) -> None:
        state = masks_on(shared)
        state.sources.pop(slot, None)
        state.cache.drop(slot)

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        params = dict(encoder.named_parameters())
        return {f"{n}.weight": params[f"{n}.weight"].detach() * m for n, m in masks_for(tensors, encoder).items()}
