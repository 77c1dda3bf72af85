//! Compiled scripts of one engine thread, bounded by memory: past the budget, the least
//! recently used go (a fleet with many device models keeps its busy scripts compiled
//! instead of starting over when a count is reached).

use std::collections::HashMap;

use super::ScriptHash;

struct Cached<V> {
    value: V,
    /// Bytes the compiled script holds (the engine's estimate).
    weight: usize,
    last_used: u64,
}

/// Scripts by content hash within `budget` bytes.
pub struct ScriptCache<V> {
    entries: HashMap<ScriptHash, Cached<V>>,
    used: usize,
    budget: usize,
    /// Counts uses: the recency order.
    clock: u64,
}

impl<V> ScriptCache<V> {
    pub fn new(budget: usize) -> Self {
        ScriptCache { entries: HashMap::new(), used: 0, budget, clock: 0 }
    }

    pub fn contains(&self, hash: &ScriptHash) -> bool {
        self.entries.contains_key(hash)
    }

    /// Marks the script as just used; whether it is here.
    pub fn touch(&mut self, hash: &ScriptHash) -> bool {
        self.clock += 1;
        let Some(entry) = self.entries.get_mut(hash) else { return false };
        entry.last_used = self.clock;
        true
    }

    /// The script (its recency untouched: see [`ScriptCache::touch`]).
    pub fn get(&self, hash: &ScriptHash) -> Option<&V> {
        self.entries.get(hash).map(|entry| &entry.value)
    }

    /// Adds a script of `weight` bytes, evicting the least recently used until it fits
    /// (the new one is kept even when it alone is over the budget).
    pub fn insert(&mut self, hash: ScriptHash, value: V, weight: usize) {
        self.remove(&hash);
        while self.used + weight > self.budget {
            let Some(oldest) =
                self.entries.iter().min_by_key(|(_, entry)| entry.last_used).map(|(h, _)| h.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
        self.clock += 1;
        self.used += weight;
        self.entries.insert(hash, Cached { value, weight, last_used: self.clock });
    }

    pub fn remove(&mut self, hash: &ScriptHash) {
        if let Some(entry) = self.entries.remove(hash) {
            self.used -= entry.weight;
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    /// Bytes held.
    pub fn used(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_go_past_the_budget() {
        let mut cache = ScriptCache::new(100);
        cache.insert("a".into(), 'a', 40);
        cache.insert("b".into(), 'b', 40);
        assert!(cache.touch(&"a".into()), "a is now the most recent");
        cache.insert("c".into(), 'c', 40);
        assert!(cache.contains(&"a".into()) && cache.contains(&"c".into()));
        assert!(!cache.contains(&"b".into()), "the least recently used went");
        assert_eq!(cache.used(), 80);
        cache.insert("huge".into(), 'h', 500);
        assert!(cache.contains(&"huge".into()), "kept even alone over the budget");
        assert_eq!(cache.used(), 500);
        cache.insert("huge".into(), 'h', 10);
        assert_eq!(cache.used(), 10, "a replaced entry's weight is given back");
    }
}
