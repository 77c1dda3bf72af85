//! Each connection's envelopes put back in sequence order.
//!
//! Why: an edge may keep several envelopes of a connection in flight
//! (`EDGE_MAX_IN_FLIGHT`). When its NATS connection breaks with k..n in flight, the
//! client may send k+j..n after the reconnect before the edge re-sends its window from
//! k (JetStream stores a repeated message id once), so the stream can hold a
//! connection's envelopes as … k-1, k+j..n, k..k+j-1 …: reordered, never lost.
//! [`Reorder`] restores the order from the message ids (`<connection>-<sequence>`, see
//! [`names::uplink_message_id`]): an envelope past a gap is held, with every later one
//! of its connection, until the gap fills or [`HOLD`] has passed without progress: the
//! hold counts from the envelope's arrival, and starts again for all those held of its
//! connection whenever one is released in sequence (the gap filling, one at a time).
//!
//! A connection's last envelope, its Offline session event, releases what its connection
//! holds at once: the edge publishes it only once every earlier envelope of the
//! connection was stored by JetStream (so came before it in the stream) or given up on
//! at the close (never re-sent), so a gap before it can never fill, and holding it would
//! report the device offline [`HOLD`] late, after its next connection came online. The
//! caller tells which envelope is a connection's last ([`Reorder::push`]'s `is_last`,
//! asked only of one past a gap); the gaps below it are given up on and counted, as at a
//! deadline, so an envelope of its connection that still comes is released at once, late.
//!
//! Nothing is ever dropped (the worker is at-least-once): an envelope whose place has
//! passed (a replay, or one that arrives after its gap was given up on) is released at
//! once and counted as late; one without a `<connection>-<sequence>` id is released at
//! once. A reaper's offline event ([`names::reaped_message_id`]: the connection's pod
//! died) is its connection's last too: what the connection holds goes first, then it. The first envelope
//! of a connection not seen yet is released at once whatever its sequence: a worker
//! that took a partition over mid-connection cannot know what came before.
//!
//! Memory: per connection the last sequence released, when it was last seen and its
//! held envelopes (an empty `Vec`, no allocation, unless it waits on a gap): 64 bytes
//! with the map's key, the connection id as a `u128`. A connection with nothing held is
//! forgotten after [`IDLE`] without an envelope, by a scan at most once per
//! [`PRUNE_EVERY`] (100,000 connections: well under a millisecond a minute). What is
//! held is bounded by what the stream delivers while a gap is open: the caller bounds it
//! by the envelopes it has fetched and not acknowledged.
//!
//! Pure and synchronous, no I/O, no clock of its own: each call is told the time, so
//! that it runs under paused time in tests. The caller calls [`Reorder::expire`] when
//! [`Reorder::next_deadline`] passes.
//!
//! [`names::uplink_message_id`]: tcpc_proto::names::uplink_message_id
//! [`names::reaped_message_id`]: tcpc_proto::names::reaped_message_id

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// How long an envelope past a gap is held for the gap to fill, counted from its
/// connection's last progress (an envelope released in sequence) or, if later, its own
/// arrival. The edge re-sends a failed window one envelope at a time, each after the
/// previous one's JetStream ack, so a gap of j fills in j round trips: what must fit is
/// one re-send, a back-off of at most 5 s then a publish of up to its 5 s timeout
/// (`EDGE_PUBLISH_TIMEOUT`), 10 s; 15 s leaves a margin for the stream's delivery to the
/// worker. A gap that makes no progress for this long is given up on.
pub const HOLD: Duration = Duration::from_secs(15);

/// How long a connection with nothing held is remembered without an envelope. Long
/// past [`HOLD`]: an envelope of a forgotten connection is released at once, as that of
/// a connection not seen yet.
pub const IDLE: Duration = Duration::from_secs(10 * 60);

/// How often idle connections are looked for: each look scans every connection.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// One connection's order.
struct Connection<T> {
    /// The last sequence released.
    released: u64,
    /// When an envelope of it was last pushed.
    last_seen: Instant,
    /// Envelopes past a gap, by sequence (equal sequences, replays, in arrival order).
    /// Its storage is released when it empties.
    held: Vec<Held<T>>,
}

/// An envelope waiting for a gap below it to fill.
struct Held<T> {
    sequence: u64,
    /// When its hold started: when it was pushed, or its connection's last progress
    /// since (an envelope released in sequence). It is held until `HOLD` after.
    since: Instant,
    item: T,
}

/// What every connection holds, and has given up on, together.
#[derive(Default)]
struct Counts {
    /// Envelopes held, over all connections.
    held: usize,
    gaps: u64,
    late: u64,
}

impl<T> Connection<T> {
    /// When the envelope held longest must be released: the earliest start of a hold
    /// plus `hold`. `None` if nothing is held.
    fn deadline(&self, hold: Duration) -> Option<Instant> {
        self.held.iter().map(|held| held.since).min().map(|since| since + hold)
    }

    /// Releases the held envelopes that are next in sequence, after giving up on the
    /// gaps below `give_up_to` (each missing stretch counted as a gap), into `out`;
    /// `counts` follows.
    fn release_held(&mut self, give_up_to: Option<u64>, out: &mut Vec<T>, counts: &mut Counts) {
        let mut ready = 0;
        for held in &self.held {
            if held.sequence <= self.released {
                // A replay of one released meanwhile.
                counts.late += 1;
            } else if held.sequence == self.released + 1 {
                self.released = held.sequence;
            } else if give_up_to.is_some_and(|last| held.sequence <= last) {
                counts.gaps += 1;
                self.released = held.sequence;
            } else {
                break;
            }
            ready += 1;
        }
        counts.held -= ready;
        out.extend(self.held.drain(..ready).map(|held| held.item));
        if self.held.is_empty() {
            self.held = Vec::new();
        }
    }
}

/// Envelopes released by one [`Reorder::push`], in the order to handle them.
pub struct Released<T> {
    items: std::iter::Chain<std::option::IntoIter<T>, std::vec::IntoIter<T>>,
}

impl<T> Released<T> {
    fn new(first: Option<T>, rest: Vec<T>) -> Self {
        Released { items: first.into_iter().chain(rest) }
    }
}

impl<T> Iterator for Released<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        self.items.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.items.size_hint()
    }
}

/// Puts each connection's envelopes back in sequence order; see the module.
pub struct Reorder<T> {
    hold: Duration,
    connections: HashMap<u128, Connection<T>>,
    /// The connections holding envelopes, by deadline: what [`Reorder::expire`] looks
    /// at, without a scan of every connection.
    deadlines: BTreeSet<(Instant, u128)>,
    counts: Counts,
    /// When idle connections are next looked for; `None` before the first push.
    next_prune: Option<Instant>,
}

impl<T> Reorder<T> {
    /// Holds an envelope past a gap for `hold` at most ([`HOLD`] in the worker).
    pub fn new(hold: Duration) -> Self {
        Reorder {
            hold,
            connections: HashMap::new(),
            deadlines: BTreeSet::new(),
            counts: Counts::default(),
            next_prune: None,
        }
    }

    /// Takes an envelope with its JetStream message id, pushed at `now`, and returns
    /// what is ready, in order: nothing if it is held behind a gap; itself, then the held
    /// envelopes of its connection it makes contiguous, if it is the next one; the held
    /// envelopes of its connection, then itself, if it is past a gap and `is_last` says
    /// it is its connection's last (asked only then: the caller decodes to tell).
    pub fn push(
        &mut self,
        message_id: Option<&str>,
        item: T,
        now: Instant,
        is_last: impl FnOnce(&T) -> bool,
    ) -> Released<T> {
        self.prune(now);
        if let Some(id) = message_id.and_then(reaped_connection) {
            let mut out = self.close(id);
            out.push(item);
            return Released::new(None, out);
        }
        let Some((id, sequence)) = message_id.and_then(connection_and_sequence) else {
            return Released::new(Some(item), Vec::new());
        };
        let connection = match self.connections.get_mut(&id) {
            Some(connection) => connection,
            None => {
                let connection = Connection { released: sequence, last_seen: now, held: Vec::new() };
                self.connections.insert(id, connection);
                return Released::new(Some(item), Vec::new());
            }
        };
        connection.last_seen = now;
        if sequence <= connection.released {
            self.counts.late += 1;
            return Released::new(Some(item), Vec::new());
        }
        let deadline = connection.deadline(self.hold);
        if sequence == connection.released + 1 {
            connection.released = sequence;
            let mut rest = Vec::new();
            if !connection.held.is_empty() {
                connection.release_held(None, &mut rest, &mut self.counts);
                // Progress: the gap is filling (the edge re-sends one at a time), so what
                // is still held waits for the hold from now.
                for held in &mut connection.held {
                    held.since = now;
                }
                reschedule(&mut self.deadlines, id, deadline, connection.deadline(self.hold));
            }
            return Released::new(Some(item), rest);
        }
        // Past a gap: after the held envelopes of lower or equal sequence.
        let last = is_last(&item);
        let at = connection.held.partition_point(|held| held.sequence <= sequence);
        connection.held.insert(at, Held { sequence, since: now, item });
        self.counts.held += 1;
        let mut rest = Vec::new();
        if last {
            // Nothing before it can come any more (see the module): its gaps are given up
            // on now, not at the deadline.
            connection.release_held(Some(sequence), &mut rest, &mut self.counts);
        }
        reschedule(&mut self.deadlines, id, deadline, connection.deadline(self.hold));
        Released::new(None, rest)
    }

    /// A reaper's offline event for connection `id` (its pod died): nothing more of the
    /// connection can come, so what it holds goes now, ahead of the event (its gaps
    /// given up on and counted), and anything of it that still comes is late.
    fn close(&mut self, id: u128) -> Vec<T> {
        let Some(connection) = self.connections.get_mut(&id) else { return Vec::new() };
        let deadline = connection.deadline(self.hold);
        let mut rest = Vec::new();
        connection.release_held(Some(u64::MAX), &mut rest, &mut self.counts);
        connection.released = u64::MAX;
        reschedule(&mut self.deadlines, id, deadline, None);
        rest
    }

    /// Drops every envelope held, keeping each connection's progress: the caller's
    /// delivery ended without acknowledging them, and they come again from the stream,
    /// to wait for their gaps as before (a fresh reorder would take the first of them for
    /// a new connection's and release it at once, ahead of its gap).
    pub fn drop_held(&mut self) {
        for connection in self.connections.values_mut() {
            connection.held.clear();
        }
        self.deadlines.clear();
        self.counts.held = 0;
    }

    /// When the envelope held longest must be released; `None` if nothing is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// Releases, in each connection's sequence order, the envelopes held for the hold
    /// by `now`, with the held envelopes below them (the gaps between are given up on,
    /// and counted) and those they make contiguous.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first()
            && deadline <= now
        {
            self.deadlines.pop_first();
            let Some(connection) = self.connections.get_mut(&id) else { continue };
            let hold = self.hold;
            let give_up_to = connection
                .held
                .iter()
                .filter(|held| held.since + hold <= now)
                .map(|held| held.sequence)
                .max();
            connection.release_held(give_up_to, &mut out, &mut self.counts);
            if let Some(next) = connection.deadline(hold) {
                self.deadlines.insert((next, id));
            }
        }
        out
    }

    /// Envelopes held, over all connections.
    pub fn held(&self) -> usize {
        self.counts.held
    }

    /// Connections remembered (the state kept, pruned after [`IDLE`]).
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Gaps given up on since the start: stretches of missing sequences that the
    /// envelopes past them were released over, at their deadline or at their
    /// connection's last envelope.
    pub fn gaps(&self) -> u64 {
        self.counts.gaps
    }

    /// Envelopes released at or below their connection's last released sequence since
    /// the start: replays, and envelopes that came after their gap was given up on.
    pub fn late(&self) -> u64 {
        self.counts.late
    }

    /// Forgets the connections with nothing held and no envelope for [`IDLE`], at most
    /// once per [`PRUNE_EVERY`].
    fn prune(&mut self, now: Instant) {
        let next_prune = *self.next_prune.get_or_insert(now + PRUNE_EVERY);
        if now < next_prune {
            return;
        }
        self.next_prune = Some(now + PRUNE_EVERY);
        self.connections.retain(|_, connection| {
            !connection.held.is_empty() || now.saturating_duration_since(connection.last_seen) < IDLE
        });
        // A burst of connections long gone leaves no table of its size behind.
        if self.connections.len() * 4 < self.connections.capacity() {
            self.connections.shrink_to(self.connections.len() * 2);
        }
    }
}

/// Moves a connection's entry in `deadlines` from `before` to `after`.
fn reschedule(
    deadlines: &mut BTreeSet<(Instant, u128)>,
    id: u128,
    before: Option<Instant>,
    after: Option<Instant>,
) {
    if before == after {
        return;
    }
    if let Some(before) = before {
        deadlines.remove(&(before, id));
    }
    if let Some(after) = after {
        deadlines.insert((after, id));
    }
}

/// The connection (32 hex digits) and sequence of an uplink message id
/// (`<connection>-<sequence>`); `None` for any other id.
/// The connection of a reaper's offline event (`<connection>-reaped`).
fn reaped_connection(message_id: &str) -> Option<u128> {
    let connection = message_id.strip_suffix("-reaped")?;
    if connection.len() != 32 || !connection.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(connection, 16).ok()
}

fn connection_and_sequence(message_id: &str) -> Option<(u128, u64)> {
    let (connection, sequence) = message_id.split_once('-')?;
    // from_str_radix and parse take a leading sign: only digits are an id.
    if connection.len() != 32 || !connection.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return None;
    }
    if sequence.is_empty() || !sequence.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some((u128::from_str_radix(connection, 16).ok()?, sequence.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use tcpc_proto::names;

    use super::*;

    const A: &str = "00000000000000010000000000000001";
    const B: &str = "00000000000000010000000000000002";

    fn id(connection: &str, sequence: u64) -> String {
        names::uplink_message_id(connection, sequence)
    }

    /// Pushes `(connection, sequence)` at `now` as the item `(connection, sequence)`;
    /// what was released.
    fn push(
        reorder: &mut Reorder<(&'static str, u64)>,
        connection: &'static str,
        sequence: u64,
        now: Instant,
    ) -> Vec<(&'static str, u64)> {
        push_marked(reorder, connection, sequence, false, now)
    }

    /// As [`push`], the envelope marked as its connection's last if `last`.
    fn push_marked(
        reorder: &mut Reorder<(&'static str, u64)>,
        connection: &'static str,
        sequence: u64,
        last: bool,
        now: Instant,
    ) -> Vec<(&'static str, u64)> {
        reorder.push(Some(&id(connection, sequence)), (connection, sequence), now, |_| last).collect()
    }

    fn sequences(released: &[(&str, u64)]) -> Vec<u64> {
        released.iter().map(|&(_, sequence)| sequence).collect()
    }

    #[test]
    fn in_order_passes_straight_through() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        for sequence in 0..5 {
            assert_eq!(push(&mut reorder, A, sequence, now), [(A, sequence)]);
        }
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (0, 0, 0));
        assert_eq!(reorder.next_deadline(), None);
    }

    #[test]
    fn the_reconnect_pattern_comes_out_in_order() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        let mut released = Vec::new();
        for sequence in [0, 1, 4, 5] {
            released.extend(push(&mut reorder, A, sequence, now));
        }
        assert_eq!(sequences(&released), [0, 1], "4 and 5 wait for 2 and 3");
        assert_eq!(reorder.held(), 2);
        assert_eq!(reorder.next_deadline(), Some(now + HOLD));
        let two = push(&mut reorder, A, 2, now);
        assert_eq!(sequences(&two), [2]);
        let three = push(&mut reorder, A, 3, now);
        assert_eq!(sequences(&three), [3, 4, 5], "the gap filled");
        released.extend(two.into_iter().chain(three).chain(push(&mut reorder, A, 6, now)));
        assert_eq!(sequences(&released), (0..=6).collect::<Vec<_>>());
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (0, 0, 0));
        assert_eq!(reorder.next_deadline(), None);
    }

    #[test]
    fn a_gap_never_filled_is_released_in_order_at_the_deadline_and_counted() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        push(&mut reorder, A, 0, start);
        assert!(push(&mut reorder, A, 3, start).is_empty());
        assert!(push(&mut reorder, A, 2, start).is_empty());
        assert_eq!(reorder.next_deadline(), Some(start + HOLD));
        assert!(reorder.expire(start + HOLD - Duration::from_millis(1)).is_empty(), "not before");
        assert_eq!(sequences(&reorder.expire(start + HOLD)), [2, 3]);
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (0, 1, 0));
        assert_eq!(reorder.next_deadline(), None);
        // The order goes on from 3.
        assert_eq!(sequences(&push(&mut reorder, A, 4, start + HOLD)), [4]);
        // The missing one, after all: released, never dropped, and late.
        assert_eq!(sequences(&push(&mut reorder, A, 1, start + HOLD)), [1]);
        assert_eq!(reorder.late(), 1);
    }

    #[test]
    fn without_progress_each_held_envelope_waits_for_the_hold_from_its_own_arrival() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        let later = start + Duration::from_secs(10);
        push(&mut reorder, A, 0, start);
        push(&mut reorder, A, 2, start);
        push(&mut reorder, A, 5, later);
        assert_eq!(reorder.next_deadline(), Some(start + HOLD));
        // 2's hold is over: the gap at 1 is given up on, not the one at 3..=4, which 5
        // waits on until its own deadline.
        assert_eq!(sequences(&reorder.expire(start + HOLD)), [2]);
        assert_eq!((reorder.held(), reorder.gaps()), (1, 1));
        assert_eq!(reorder.next_deadline(), Some(later + HOLD));
        assert_eq!(sequences(&push(&mut reorder, A, 3, start + HOLD)), [3]);
        assert_eq!(reorder.next_deadline(), Some(start + HOLD + HOLD), "progress: 5's hold restarts");
        assert_eq!(sequences(&push(&mut reorder, A, 4, start + HOLD)), [4, 5]);
        assert_eq!((reorder.held(), reorder.gaps(), reorder.next_deadline()), (0, 1, None));
    }

    #[test]
    fn a_gap_filled_one_at_a_time_is_never_given_up_while_it_progresses() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        let step = Duration::from_secs(10);
        let mut released = push(&mut reorder, A, 0, start);
        for sequence in 5..=8 {
            released.extend(push(&mut reorder, A, sequence, start));
        }
        assert_eq!(reorder.held(), 4);
        // The edge re-sends 1..=4 one at a time, one every 10 s: 40 s in all, each step
        // within the hold of the one before.
        let mut now = start;
        for sequence in 1..=4 {
            now += step;
            assert!(reorder.expire(now).is_empty(), "{sequence}: nothing given up");
            released.extend(push(&mut reorder, A, sequence, now));
            if sequence < 4 {
                assert_eq!(reorder.next_deadline(), Some(now + HOLD), "the hold restarts");
            }
        }
        assert_eq!(sequences(&released), (0..=8).collect::<Vec<_>>());
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (0, 0, 0));
        assert_eq!(reorder.next_deadline(), None);
    }

    #[test]
    fn a_gap_that_stops_progressing_is_given_up_hold_after_its_last_progress() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        push(&mut reorder, A, 0, start);
        push(&mut reorder, A, 3, start);
        push(&mut reorder, A, 4, start);
        let progress = start + Duration::from_secs(10);
        assert_eq!(sequences(&push(&mut reorder, A, 1, progress)), [1]);
        assert!(reorder.expire(start + HOLD).is_empty(), "not at the hold from arrival");
        assert_eq!(reorder.next_deadline(), Some(progress + HOLD));
        assert!(reorder.expire(progress + HOLD - Duration::from_millis(1)).is_empty());
        assert_eq!(sequences(&reorder.expire(progress + HOLD)), [3, 4], "2 given up");
        assert_eq!((reorder.held(), reorder.gaps(), reorder.next_deadline()), (0, 1, None));
    }

    #[test]
    fn one_expiry_gives_up_on_every_gap_below_the_envelopes_held_too_long() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        push(&mut reorder, A, 0, start);
        push(&mut reorder, A, 4, start);
        push(&mut reorder, A, 2, start);
        assert_eq!(sequences(&reorder.expire(start + HOLD)), [2, 4]);
        assert_eq!(reorder.gaps(), 2, "1 and 3");
    }

    #[test]
    fn a_connections_last_envelope_releases_what_it_holds_at_once() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        let mut released = Vec::new();
        for sequence in [1, 2, 4, 5] {
            released.extend(push(&mut reorder, A, sequence, start));
        }
        assert_eq!(sequences(&released), [1, 2], "4 and 5 wait for 3");
        let later = start + Duration::from_secs(1);
        push(&mut reorder, B, 0, later);
        assert!(push(&mut reorder, B, 2, later).is_empty(), "another connection's gap");
        // The Offline event: 3 was given up on at the close, it can never come.
        released.extend(push_marked(&mut reorder, A, 6, true, later));
        assert_eq!(sequences(&released), [1, 2, 4, 5, 6], "at once, not after the hold");
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (1, 1, 0), "B's gap is its own");
        assert_eq!(reorder.next_deadline(), Some(later + HOLD), "B's; A's is gone");
        // Were 3 to come after all: released at once, never dropped, and late.
        assert_eq!(push(&mut reorder, A, 3, later), [(A, 3)]);
        assert_eq!((reorder.gaps(), reorder.late()), (1, 1));
    }

    #[test]
    fn a_connections_last_envelope_in_sequence_is_released_as_any() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        push(&mut reorder, A, 0, now);
        let last = reorder.push(Some(&id(A, 1)), (A, 1), now, |_| unreachable!("asked only past a gap"));
        assert_eq!(last.collect::<Vec<_>>(), [(A, 1)]);
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (0, 0, 0));
        assert_eq!(push(&mut reorder, A, 0, now), [(A, 0)], "a replay: late");
        assert_eq!(reorder.late(), 1);
    }

    #[test]
    fn a_connections_last_envelope_seen_first_is_released_at_once() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        assert_eq!(push_marked(&mut reorder, A, 9, true, now), [(A, 9)], "taken over at its close");
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (0, 0, 0));
    }

    #[test]
    fn a_late_envelope_is_released_and_counted() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        for sequence in 0..3 {
            push(&mut reorder, A, sequence, now);
        }
        assert_eq!(push(&mut reorder, A, 1, now), [(A, 1)], "a replay");
        assert_eq!(push(&mut reorder, A, 2, now), [(A, 2)], "a replay of the last released");
        assert_eq!(reorder.late(), 2);
        assert_eq!(push(&mut reorder, A, 3, now), [(A, 3)], "the order goes on");
    }

    #[test]
    fn a_late_envelope_passes_what_is_held() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        push(&mut reorder, A, 0, now);
        push(&mut reorder, A, 1, now);
        assert!(push(&mut reorder, A, 3, now).is_empty());
        assert_eq!(push(&mut reorder, A, 0, now), [(A, 0)]);
        assert_eq!((reorder.held(), reorder.late()), (1, 1));
    }

    #[test]
    fn a_replay_of_a_held_envelope_is_held_and_released_with_it() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        push(&mut reorder, A, 0, now);
        push(&mut reorder, A, 2, now);
        push(&mut reorder, A, 3, now);
        push(&mut reorder, A, 2, now);
        assert_eq!(reorder.held(), 3);
        assert_eq!(sequences(&push(&mut reorder, A, 1, now)), [1, 2, 2, 3]);
        assert_eq!((reorder.held(), reorder.late()), (0, 1));
    }

    #[test]
    fn a_connection_not_seen_yet_passes_whatever_its_sequence() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        assert_eq!(push(&mut reorder, A, 57, now), [(A, 57)], "taken over mid-connection");
        assert_eq!(push(&mut reorder, A, 58, now), [(A, 58)]);
        assert!(push(&mut reorder, A, 60, now).is_empty(), "its order is known from there");
        assert_eq!((reorder.gaps(), reorder.late()), (0, 0));
    }

    #[test]
    fn interleaved_connections_do_not_hold_each_other_up() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        push(&mut reorder, A, 0, now);
        push(&mut reorder, B, 0, now);
        assert!(push(&mut reorder, A, 2, now).is_empty());
        assert_eq!(push(&mut reorder, B, 1, now), [(B, 1)], "A's gap does not hold B");
        assert!(push(&mut reorder, B, 3, now).is_empty());
        assert_eq!(push(&mut reorder, A, 1, now), [(A, 1), (A, 2)], "nor B's A");
        assert_eq!(push(&mut reorder, B, 2, now), [(B, 2), (B, 3)]);
        assert_eq!(reorder.held(), 0);
    }

    #[test]
    fn idle_connections_are_forgotten_unless_they_hold_envelopes() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        push(&mut reorder, A, 0, start);
        push(&mut reorder, B, 0, start);
        push(&mut reorder, B, 2, start);
        assert_eq!(reorder.connections(), 2);
        // Not yet idle long enough at the first look.
        push(&mut reorder, B, 5, start + PRUNE_EVERY);
        assert_eq!(reorder.connections(), 2);
        let later = start + IDLE + PRUNE_EVERY;
        push(&mut reorder, "00000000000000010000000000000003", 0, later);
        assert_eq!(reorder.connections(), 2, "A forgotten; B holds envelopes; the new one");
        assert_eq!(push(&mut reorder, A, 5, later), [(A, 5)], "A is as new: released at once");
        assert_eq!(reorder.late(), 0);
        assert_eq!(sequences(&reorder.expire(later)), [2, 5]);
    }

    #[test]
    fn ids_that_are_not_a_connection_and_sequence_pass() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        let ids = [
            None,
            Some(names::reaped_message_id(A)),
            Some("c1-7".to_owned()),
            Some(format!("+{}-1", &A[1..])),
            Some(format!("{A}-+1")),
            Some(format!("{A}-")),
            Some(format!("{A}-1-2")),
        ];
        for (item, id) in ids.iter().enumerate() {
            assert_eq!(reorder.push(id.as_deref(), item, now, |_| false).collect::<Vec<_>>(), [item]);
        }
        assert_eq!(reorder.connections(), 0);
        assert_eq!(connection_and_sequence(&id(A, 7)), Some((0x1_0000_0000_0000_0001, 7)));
    }

    #[test]
    fn a_reapers_offline_event_comes_after_what_its_connection_holds() {
        let mut reorder = Reorder::new(HOLD);
        let start = Instant::now();
        let mut released = Vec::new();
        for sequence in [0, 1, 3, 4] {
            released.extend(push(&mut reorder, A, sequence, start));
        }
        push(&mut reorder, B, 0, start);
        assert!(push(&mut reorder, B, 2, start).is_empty(), "another connection's gap");
        assert_eq!(sequences(&released), [0, 1], "3 and 4 wait for 2");
        let reaped = (A, u64::MAX);
        let out: Vec<_> =
            reorder.push(Some(&names::reaped_message_id(A)), reaped, start, |_| unreachable!()).collect();
        assert_eq!(out, [(A, 3), (A, 4), reaped], "held first, then the event, at once");
        assert_eq!((reorder.held(), reorder.gaps(), reorder.late()), (1, 1, 0), "B's gap is its own");
        assert_eq!(push(&mut reorder, A, 2, start), [(A, 2)], "a straggler: released, late");
        assert_eq!(reorder.late(), 1);
        let unknown = "00000000000000010000000000000009";
        let out: Vec<_> =
            reorder.push(Some(&names::reaped_message_id(unknown)), (unknown, 0), start, |_| false).collect();
        assert_eq!(out, [(unknown, 0)], "a connection not seen: the event alone");
    }

    #[test]
    fn held_envelopes_dropped_for_a_redelivery_wait_behind_their_gap_again() {
        let mut reorder = Reorder::new(HOLD);
        let now = Instant::now();
        for sequence in [0, 1] {
            push(&mut reorder, A, sequence, now);
        }
        assert!(push(&mut reorder, A, 3, now).is_empty(), "3 waits for 2");
        reorder.drop_held();
        assert_eq!((reorder.held(), reorder.next_deadline()), (0, None));
        // Redelivered in the stream's order: 3 again, then 2.
        assert!(push(&mut reorder, A, 3, now).is_empty(), "not taken for a new connection's first");
        assert_eq!(push(&mut reorder, A, 2, now), [(A, 2), (A, 3)]);
        assert_eq!((reorder.gaps(), reorder.late()), (0, 0));
    }

    #[test]
    fn a_connection_costs_64_bytes_with_its_key() {
        assert!(size_of::<(u128, Connection<bytes::Bytes>)>() <= 64);
    }
}
