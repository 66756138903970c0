"""Encoded frames ↔ MTU-safe media packets, and the receiver's view of the reference chain.

The sender cuts each frame into near-equal fragments of at most MAX_PAYLOAD bytes (equal sizes
keep the last fragment from being a tiny extra packet). The receiver reassembles fragments that
arrive in any order, with bounded memory: incomplete frames are dropped once they fall too far
behind or grow too old, because a frame that cannot complete must not pin memory forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from media.wiremedia import (
    MAX_FRAGMENTS,
    MAX_PAYLOAD,
    TIMESTAMP_BITS,
    TIMESTAMP_RATE,
    Flags,
    MediaLocalError,
    MediaPacket,
    SeqUnwrapper,
    StreamId,
    seconds_to_ticks,
)

# An incomplete frame is abandoned this long after its first fragment arrived. NACK gives up
# after ~1 s (feedback.NACK_DEADLINE); keeping fragments longer than that cannot help.
ASSEMBLY_HORIZON = 1.0
# At most this many frames in assembly at once: 1 s of 60 fps video, plus slack.
MAX_PENDING_FRAMES = 96
# Bytes held in incomplete frames, all streams of one assembler: ~ a second of 8 Mb/s video.
MAX_PENDING_BYTES = 1 << 20


class FrameTooLarge(MediaLocalError):
    """The encoder produced a frame that does not fit MAX_FRAGMENTS packets."""


class Packetizer:
    """Cuts one stream's encoded frames into packets with consecutive seq and frame ids."""

    def __init__(self, stream: StreamId, codec: int = 0, *, first_seq: int = 0) -> None:
        self.stream = stream
        self.codec = codec
        self._seq = first_seq % (1 << 16)
        self._frame_id = 0

    def packetize(self, frame: bytes, pts: float, keyframe: bool) -> list[MediaPacket]:
        """Packets for one frame; `pts` is in seconds of the sender's media clock."""
        if not frame:
            raise MediaLocalError("empty frame")
        count = -(-len(frame) // MAX_PAYLOAD)
        if count > MAX_FRAGMENTS:
            raise FrameTooLarge(f"{len(frame)} B needs {count} fragments > {MAX_FRAGMENTS}")
        size = -(-len(frame) // count)
        base = Flags.KEYFRAME if keyframe else Flags.NONE
        ts = seconds_to_ticks(pts)
        packets = []
        for index in range(count):
            flags = base | Flags.MARKER if index == count - 1 else base
            packets.append(
                MediaPacket(
                    stream=self.stream,
                    seq=self._seq,
                    timestamp=ts,
                    frame_id=self._frame_id,
                    frag_index=index,
                    frag_count=count,
                    payload=frame[index * size : (index + 1) * size],
                    flags=flags,
                    codec=self.codec,
                )
            )
            self._seq = (self._seq + 1) % (1 << 16)
        self._frame_id = (self._frame_id + 1) % (1 << 32)
        return packets


@dataclass(frozen=True, slots=True)
class AssembledFrame:
    """A complete encoded frame as the receiver rebuilt it."""

    stream: StreamId
    frame_id: int
    pts: float  # seconds of the sender's clock (unwrapped)
    keyframe: bool
    data: bytes
    codec: int
    first_arrival: float  # receiver time of the first fragment
    completed: float  # receiver time of the last missing fragment


class _Partial:
    __slots__ = ("codec", "count", "first_arrival", "fragments", "keyframe", "nbytes", "timestamp")

    def __init__(self, pkt: MediaPacket, now: float) -> None:
        self.count = pkt.frag_count
        self.timestamp = pkt.timestamp
        self.keyframe = pkt.keyframe
        self.codec = pkt.codec
        self.first_arrival = now
        self.fragments: dict[int, bytes] = {}
        self.nbytes = 0


class FrameAssembler:
    """Rebuilds frames of one stream from fragments in any order, with bounded memory.

    `push` returns frames as they complete (not necessarily in frame-id order: ordering and
    decodability are the jitter buffer's job, which knows when to stop waiting).
    """

    def __init__(self, stream: StreamId) -> None:
        self.stream = stream
        self._partials: dict[int, _Partial] = {}
        self._bytes = 0
        self._done: dict[int, float] = {}  # recently completed frame ids → completion time
        self._ts = SeqUnwrapper(TIMESTAMP_BITS)
        self.frames_completed = 0
        self.frames_abandoned = 0
        self.duplicates = 0
        self.mismatches = 0

    def push(self, pkt: MediaPacket, now: float) -> list[AssembledFrame]:
        if pkt.stream != self.stream:
            raise MediaLocalError("packet for another stream")
        self.expire(now)
        if pkt.frame_id in self._done:
            self.duplicates += 1
            return []
        part = self._partials.get(pkt.frame_id)
        if part is None:
            part = _Partial(pkt, now)
            self._partials[pkt.frame_id] = part
            self._evict_over_count()
        elif (
            part.count != pkt.frag_count
            or part.timestamp != pkt.timestamp
            or part.keyframe != pkt.keyframe
        ):
            # Fragments of one frame must agree; drop the newcomer rather than trust either.
            self.mismatches += 1
            return []
        if pkt.frag_index in part.fragments:
            self.duplicates += 1
            return []
        part.fragments[pkt.frag_index] = pkt.payload
        part.nbytes += len(pkt.payload)
        self._bytes += len(pkt.payload)
        if len(part.fragments) < part.count:
            self._evict_over_bytes(keep=pkt.frame_id)
            return []
        del self._partials[pkt.frame_id]
        self._bytes -= part.nbytes
        self._done[pkt.frame_id] = now
        self.frames_completed += 1
        data = b"".join(part.fragments[i] for i in range(part.count))
        pts = self._ts.unwrap(part.timestamp) / TIMESTAMP_RATE
        frame = AssembledFrame(
            stream=self.stream,
            frame_id=pkt.frame_id,
            pts=pts,
            keyframe=part.keyframe,
            data=data,
            codec=part.codec,
            first_arrival=part.first_arrival,
            completed=now,
        )
        return [frame]

    def expire(self, now: float) -> None:
        """Drop incomplete frames older than ASSEMBLY_HORIZON and forget old completions.

        Runs for every packet, so it looks only at the oldest entries: both dicts are in
        insertion order, which is time order as the receiver's clock only moves forward.
        """
        partials, done = self._partials, self._done
        while partials:
            fid = next(iter(partials))
            if now - partials[fid].first_arrival <= ASSEMBLY_HORIZON:
                break
            self._drop(fid)
        while done:
            fid = next(iter(done))
            if now - done[fid] <= ASSEMBLY_HORIZON and len(done) <= 4 * MAX_PENDING_FRAMES:
                break
            del done[fid]

    @property
    def pending_frames(self) -> int:
        return len(self._partials)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def _drop(self, fid: int) -> None:
        part = self._partials.pop(fid)
        self._bytes -= part.nbytes
        self.frames_abandoned += 1

    def _oldest(self) -> int:
        return min(self._partials, key=lambda f: self._partials[f].first_arrival)

    def _evict_over_count(self) -> None:
        while len(self._partials) > MAX_PENDING_FRAMES:
            self._drop(self._oldest())

    def _evict_over_bytes(self, keep: int) -> None:
        while self._bytes > MAX_PENDING_BYTES and len(self._partials) > 1:
            victim = self._oldest()
            if victim == keep:
                victim = min(
                    (f for f in self._partials if f != keep),
                    key=lambda f: self._partials[f].first_arrival,
                )
            self._drop(victim)
        if self._bytes > MAX_PENDING_BYTES:
            self._drop(keep)


class ReferenceChain:
    """Decides whether a frame, taken in order, is decodable.

    Codecs like VP8 predict each frame from the previous one: after a lost frame every frame is
    garbage until the next keyframe. Feed frames in frame-id order (the video jitter buffer does);
    `accept` says whether the decoder can use this one, and `broken` whether a PLI is needed.
    """

    def __init__(self) -> None:
        self._last: int | None = None
        self.broken = True  # nothing decodable before the first keyframe

    def accept(self, frame_id: int, keyframe: bool) -> bool:
        if keyframe:
            self.broken = False
        elif self._last is None or frame_id != self._last + 1:
            self.broken = True
        self._last = frame_id
        return not self.broken

    def skip_to(self, frame_id: int) -> None:
        """Frames before `frame_id` will never come: the chain breaks unless it is a keyframe."""
        if self._last is None or frame_id != self._last + 1:
            self.broken = True
