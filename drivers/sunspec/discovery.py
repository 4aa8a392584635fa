"""Finding a device's SunSpec map and planning the reads of each cycle.

A SunSpec map is the marker "SunS" (0x5375 0x6E53) at the base address, then
one block per model -- ``ID``, ``L``, ``L`` registers -- and an end marker
(``ID`` 0xFFFF, ``L`` 0).

Public API:

``async discover(read, bases) -> ModelMap``
    ``read(address, count)`` is an awaitable returning holding registers; it
    raises ``DeviceRejected`` (from ``drivers.sunspec.link``) for a Modbus
    exception response.  Each base in ``bases`` is probed in order; the first
    holding the marker is walked.  An exception response or other content at a
    base means "not here"; a timeout is not caught (the device is not
    answering at all, trying more bases would only delay the offline verdict).
    Raises ``NotSunSpec`` when no base holds the marker or the chain is
    malformed.

``plan_reads(blocks, max_count=125, max_gap=16) -> list[ReadSpan]``
    Fewest requests that cover ``blocks`` ((address, count) pairs): blocks at
    most ``max_gap`` registers apart are merged (the registers between them lie
    inside the map, so they are readable) when merging does not add a request,
    and every request reads at most ``max_count`` registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from drivers.sunspec.link import DeviceRejected

SUNS_MARKER = (0x5375, 0x6E53)
END_MODEL_ID = 0xFFFF
AUTO_BASES = (40000, 0, 50000)
MAX_REGISTERS_PER_READ = 125
MAX_MODELS = 200  # a chain longer than this is corrupt, not a device

Reader = Callable[[int, int], Awaitable[list[int]]]


class NotSunSpec(Exception):
    """No usable SunSpec map at the probed addresses."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    model_id: int
    address: int  # of the model's ID register
    length: int  # L: registers after ID and L

    @property
    def end(self) -> int:
        return self.address + 2 + self.length


@dataclass(frozen=True, slots=True)
class ModelMap:
    base_address: int
    models: tuple[ModelEntry, ...]
    end_address: int  # where the chain ended
    end_marker: bool = True  # False: the chain ended with an exception response, not 0xFFFF

    @property
    def model_ids(self) -> list[int]:
        return [m.model_id for m in self.models]

    def first(self, model_ids: Iterable[int]) -> ModelEntry | None:
        """The first model in the map whose id is in ``model_ids``, in the order of ``model_ids``."""
        for model_id in model_ids:
            for entry in self.models:
                if entry.model_id == model_id:
                    return entry
        return None


@dataclass(frozen=True, slots=True)
class ReadSpan:
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


async def _probe(read: Reader, base: int) -> bool:
    try:
        marker = await read(base, 2)
    except DeviceRejected:
        return False
    return tuple(marker) == SUNS_MARKER


async def discover(read: Reader, bases: Iterable[int]) -> ModelMap:
    tried = []
    for base in bases:
        tried.append(base)
        if await _probe(read, base):
            return await _walk(read, base)
    raise NotSunSpec(f"no SunSpec marker 'SunS' at {', '.join(map(str, tried))}")


async def _walk(read: Reader, base: int) -> ModelMap:
    address = base + 2
    models: list[ModelEntry] = []
    while len(models) <= MAX_MODELS:
        if address + 2 > 0x10000:
            raise NotSunSpec(f"model chain from base {base} runs past register 65535")
        try:
            model_id, length = await read(address, 2)
        except DeviceRejected as error:
            # Some devices end the map without an end marker.
            if models:
                return ModelMap(base, tuple(models), address, end_marker=False)
            raise NotSunSpec(f"no model header at {address} after marker at {base}: {error}") from None
        if model_id == END_MODEL_ID:
            return ModelMap(base, tuple(models), address)
        if model_id == 0 and length == 0:
            return ModelMap(base, tuple(models), address, end_marker=False)
        models.append(ModelEntry(model_id, address, length))
        address += 2 + length
    raise NotSunSpec(f"more than {MAX_MODELS} models from base {base}: chain is corrupt")


def _requests(count: int, max_count: int) -> int:
    return -(-count // max_count)


def plan_reads(
    blocks: Iterable[tuple[int, int]], max_count: int = MAX_REGISTERS_PER_READ, max_gap: int = 16
) -> list[ReadSpan]:
    merged: list[tuple[int, int, int]] = []  # start, end, requests
    for start, count in sorted(blocks):
        end = start + count
        if merged:
            m_start, m_end, m_requests = merged[-1]
            if start <= m_end + max_gap:
                joined_end = max(end, m_end)
                joined = _requests(joined_end - m_start, max_count)
                alone = _requests(max(0, end - max(start, m_end)), max_count)
                if joined <= m_requests + alone:
                    merged[-1] = (m_start, joined_end, joined)
                    continue
        merged.append((start, end, _requests(count, max_count)))
    spans = []
    for start, end, _ in merged:
        for address in range(start, end, max_count):
            spans.append(ReadSpan(address, min(max_count, end - address)))
    return spans
