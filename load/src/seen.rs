//! Which sequence numbers of one device arrived: duplicates and order, by sequence.

/// A device's sequences seen so far.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Bit `s` is set once sequence `s` arrived.
    bits: Vec<u64>,
    /// One past the highest sequence seen.
    next: u64,
    /// Distinct sequences seen.
    pub unique: u64,
    pub duplicates: u64,
    /// New sequences that arrived after a higher one.
    pub out_of_order: u64,
}

/// The highest sequence a device may have: a stamp above it is garbage, and would cost
/// its bit set's memory.
pub const MAX_SEQ: u64 = 1 << 32;

/// What one arrival was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    New,
    Duplicate,
    /// New, but after a higher sequence of the same device.
    OutOfOrder,
    /// Above [`MAX_SEQ`]: not counted.
    Invalid,
}

impl Seen {
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq > MAX_SEQ {
            return Arrival::Invalid;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & bit != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.bits[word] |= bit;
        self.unique += 1;
        if seq + 1 < self.next {
            self.out_of_order += 1;
            return Arrival::OutOfOrder;
        }
        self.next = seq + 1;
        Arrival::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_new_duplicate_and_late_arrivals() {
        let mut seen = Seen::default();
        let arrivals: Vec<_> = [0, 1, 3, 2, 3, 100, 0].into_iter().map(|s| seen.record(s)).collect();
        use Arrival::*;
        assert_eq!(arrivals, [New, New, New, OutOfOrder, Duplicate, New, Duplicate]);
        assert_eq!((seen.unique, seen.duplicates, seen.out_of_order), (5, 2, 1));
        assert_eq!(seen.record(MAX_SEQ + 1), Invalid);
        assert_eq!(seen.unique, 5);
    }
}
