"""Loss recovery: receiver NACKs, the sender's retransmission buffer, and throttled PLIs.

A lost packet is asked for again (NACK) when that can still beat the playout deadline; when a
frame is lost for good, the receiver asks for a keyframe (PLI) instead, but not so often that
keyframes (5-10× a normal frame) would themselves congest the path.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from media.wiremedia import (
    MAX_FRAGMENTS,
    MAX_NACK_SEQS,
    Flags,
    MediaLocalError,
    MediaPacket,
    NackPacket,
    PliPacket,
    SeqUnwrapper,
    StreamId,
)

# Wait this long after a gap appears before NACKing: a packet a few slots late is reordered, not
# lost. 15 ms ≈ a few packet intervals of a video burst; WebRTC's NackRequester waits similarly
# short (it NACKs at once unless its reordering histogram says otherwise).
NACK_REORDER_WAIT = 0.015
# Retry a NACK after NACK_RETRY_RTTS × RTT (at least NACK_MIN_RETRY), growing by NACK_BACKOFF
# per attempt so a dead path is not flooded. One RTT, as WebRTC: waiting longer costs a freeze,
# an early retry costs at worst one duplicate packet.
NACK_RETRY_RTTS = 1.0
NACK_MIN_RETRY = 0.020
NACK_BACKOFF = 1.5
# On a lossy path one NACK round in five fails (the NACK or its answer lost, 1 − 0.9² at 10 %),
# and each failure costs a round trip of stalled video. From DUPLICATE_LOSS packet loss on, NACKs
# and the retransmissions answering them are sent twice: a round then fails only when both copies
# of one leg are lost (~2 % at 10 % loss), for ~loss × the video rate of extra traffic (the
# retransmissions; NACKs are a few dozen bytes). Like FEC, but only on packets known to be lost.
DUPLICATE_LOSS = 0.03
# The receiver's loss estimate (per stream, for DUPLICATE_LOSS) is an EWMA over packets, gain
# 1/128: ~4 s of 30 fps video.
LOSS_GAIN = 1 / 128
# WebRTC gives up after 10 attempts (kMaxNackRetries) and keeps at most 1000 entries
# (kMaxNackPackets); past one second a retransmission cannot reach a live call in time.
NACK_MAX_TRIES = 10
NACK_MAX_LIST = 1000
NACK_DEADLINE = 1.0
# The sender keeps packets for retransmission this long and this many: 1 s ≈ 900 packets of
# 8 Mb/s video, covering NACK_DEADLINE.
RTX_MAX_AGE = 1.0
RTX_MAX_PACKETS = 2048
# Re-request a keyframe no sooner than this, nor sooner than PLI_RETRY_RTTS round trips: a
# keyframe needs a round trip plus an encode to show up. WebRTC re-requests every 200 ms.
PLI_MIN_INTERVAL = 0.200
PLI_RETRY_RTTS = 1.5
# The sender ignores a NACK for a packet it resent less than this many RTTs ago: that NACK
# crossed the resend. Under one RTT, since the receiver's retry (NACK_RETRY_RTTS) plus jitter can
# come back a little sooner than one RTT after our resend left.
RTX_SUPPRESS_RTTS = 0.75
# The sender makes at most one keyframe per this interval however many PLIs arrive.
KEYFRAME_MIN_INTERVAL = 0.100


def copies_for(loss: float) -> int:
    """How many copies of a NACK or a retransmission to send at this loss (DUPLICATE_LOSS)."""
    return 2 if loss >= DUPLICATE_LOSS else 1


@dataclass(slots=True)
class _Missing:
    detected: float
    next_send: float
    tries: int = 0


class NackGenerator:
    """Receiver side, one stream: detects sequence gaps and schedules NACKs for them."""

    def __init__(self, stream: StreamId, rtt: float = 0.1) -> None:
        self.stream = stream
        self.rtt = rtt
        self._unwrap = SeqUnwrapper()
        self._highest: int | None = None
        self._missing: dict[int, _Missing] = {}
        self.nacks_sent = 0  # NACK packets
        self.seqs_requested = 0  # sequence numbers asked for, retries included
        self.recovered = 0  # NACKed packets that then arrived
        self.reordered = 0  # missing packets that arrived before any NACK
        self.given_up = 0
        self.overflows = 0
        self._seen = 0.0  # packets and NACKed packets, decayed by LOSS_GAIN per packet
        self._lost = 0.0

    @property
    def loss(self) -> float:
        """Recent fraction of packets that had to be NACKed (EWMA over ~1/LOSS_GAIN packets)."""
        return self._lost / self._seen if self._seen else 0.0

    @property
    def copies(self) -> int:
        """How many copies of each NACK to send (see DUPLICATE_LOSS)."""
        return copies_for(self.loss)

    def set_rtt(self, rtt: float) -> None:
        self.rtt = rtt

    @property
    def missing(self) -> int:
        return len(self._missing)

    def on_packet(self, seq: int, now: float, frame_end: int | None = None) -> bool:
        """Record an arrival; True when the gap is too big to NACK and a keyframe is needed.

        `frame_end` is the seq of the last fragment of this packet's frame (seq − frag_index +
        frag_count − 1): with it, a lost tail of a frame is noticed now, not a frame later.
        """
        ext = self._unwrap.unwrap(seq)
        top = ext
        if frame_end is not None:
            end = self._unwrap.peek(frame_end % (1 << 16))
            if ext < end <= ext + MAX_FRAGMENTS:
                top = end
        if self._highest is None:
            self._highest = ext
        entry = self._missing.pop(ext, None)
        if entry is not None:
            if entry.tries:
                self.recovered += 1
            else:
                self.reordered += 1
        if top <= self._highest:
            return False
        gap = top - self._highest - (1 if top == ext else 0)
        # Every new sequence number counts as a packet; NACKed ones count as lost (in `poll`).
        decay = (1 - LOSS_GAIN) ** (top - self._highest)
        self._seen = self._seen * decay + (top - self._highest)
        self._lost *= decay
        if len(self._missing) + gap > NACK_MAX_LIST:
            self.given_up += len(self._missing) + gap
            self._missing.clear()
            self.overflows += 1
            self._highest = top
            return True
        for s in range(self._highest + 1, top + 1):
            if s != ext:
                self._missing[s] = _Missing(now, now + NACK_REORDER_WAIT)
        self._highest = top
        return False

    def poll(self, now: float) -> NackPacket | None:
        """A NACK for every missing packet whose (re)try time has come, or None."""
        for s in [s for s, e in self._missing.items() if self._expired(e, now)]:
            del self._missing[s]
            self.given_up += 1
        due = [s for s, e in self._missing.items() if e.next_send <= now][:MAX_NACK_SEQS]
        if not due:
            return None
        for s in due:
            entry = self._missing[s]
            if not entry.tries:
                self._lost += 1
            entry.tries += 1
            interval = max(NACK_MIN_RETRY, NACK_RETRY_RTTS * self.rtt)
            entry.next_send = now + interval * NACK_BACKOFF ** (entry.tries - 1)
        self.nacks_sent += 1
        self.seqs_requested += len(due)
        return NackPacket(self.stream, tuple(s & 0xFFFF for s in due))

    def next_timeout(self) -> float | None:
        times = [min(e.next_send, e.detected + NACK_DEADLINE) for e in self._missing.values()]
        return min(times, default=None)

    @staticmethod
    def _expired(entry: _Missing, now: float) -> bool:
        return now - entry.detected > NACK_DEADLINE or entry.tries >= NACK_MAX_TRIES


class RetransmissionBuffer:
    """Sender side: recent packets by (stream, seq), bounded in count and age."""

    def __init__(self) -> None:
        self._packets: OrderedDict[tuple[StreamId, int], tuple[MediaPacket, float]] = OrderedDict()
        self._resent: dict[tuple[StreamId, int], float] = {}
        self.retransmitted = 0
        self.unavailable = 0  # NACKed packets already forgotten
        self.suppressed = 0  # NACKs for packets resent less than an RTT ago

    def __len__(self) -> int:
        return len(self._packets)

    def store(self, pkt: MediaPacket, now: float) -> None:
        if pkt.retransmit:
            raise MediaLocalError("store originals, not retransmissions")
        key = (pkt.stream, pkt.seq)
        self._packets.pop(key, None)
        self._resent.pop(key, None)
        self._packets[key] = (pkt, now)
        self._expire(now)

    def on_nack(
        self, nack: NackPacket, now: float, rtt: float, loss: float = 0.0
    ) -> list[MediaPacket]:
        """The packets to send again, flagged RETRANSMIT (give each a fresh transport seq);
        twice each when the path loses `loss` ≥ DUPLICATE_LOSS of its packets."""
        copies = copies_for(loss)
        self._expire(now)
        out = []
        for seq in dict.fromkeys(nack.seqs):
            key = (nack.stream, seq)
            stored = self._packets.get(key)
            if stored is None:
                self.unavailable += 1
                continue
            last = self._resent.get(key)
            if last is not None and now - last < RTX_SUPPRESS_RTTS * rtt:
                # Answering a retry that crossed our previous answer would double the traffic.
                self.suppressed += 1
                continue
            self._resent[key] = now
            self.retransmitted += 1
            out += [replace(stored[0], flags=stored[0].flags | Flags.RETRANSMIT)] * copies
        return out

    def _expire(self, now: float) -> None:
        while self._packets:
            key, (_, sent) = next(iter(self._packets.items()))
            if len(self._packets) <= RTX_MAX_PACKETS and now - sent <= RTX_MAX_AGE:
                break
            del self._packets[key]
            self._resent.pop(key, None)


class PliController:
    """Receiver side: turns "keyframe needed" into PLIs, repeated but throttled until satisfied."""

    def __init__(self, stream: StreamId = StreamId.VIDEO, rtt: float = 0.1) -> None:
        self.stream = stream
        self.rtt = rtt
        self._needed = False
        self._last_sent: float | None = None
        self.plis_sent = 0

    def set_rtt(self, rtt: float) -> None:
        self.rtt = rtt

    @property
    def interval(self) -> float:
        return max(PLI_MIN_INTERVAL, PLI_RETRY_RTTS * self.rtt)

    @property
    def needed(self) -> bool:
        return self._needed

    def request(self) -> None:
        self._needed = True

    def satisfied(self) -> None:
        """A keyframe arrived: stop asking."""
        self._needed = False

    def poll(self, now: float) -> PliPacket | None:
        if not self._needed:
            return None
        if self._last_sent is not None and now - self._last_sent < self.interval:
            return None
        self._last_sent = now
        self.plis_sent += 1
        return PliPacket(self.stream)

    def next_timeout(self) -> float | None:
        if not self._needed:
            return None
        return 0.0 if self._last_sent is None else self._last_sent + self.interval


class KeyframeGate:
    """Sender side: one keyframe answers every PLI that arrives within a short interval."""

    def __init__(self) -> None:
        self._last: float | None = None
        self.plis_received = 0
        self.keyframes_forced = 0

    def on_pli(self, now: float) -> bool:
        """True when the encoder should make the next frame a keyframe."""
        self.plis_received += 1
        if self._last is not None and now - self._last < KEYFRAME_MIN_INTERVAL:
            return False
        self._last = now
        self.keyframes_forced += 1
        return True
