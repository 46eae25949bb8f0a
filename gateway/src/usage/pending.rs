//! Settlements waiting for the store: sealed batches, each keeping its id across retries (the
//! store applies a batch once per id), and the open one still filling. Bounded: past
//! [`MAX_PENDING`] the oldest go, counted and logged, never silently.

use std::collections::VecDeque;
use tollgate_quota::Settlement;

/// Most settlements held for retry while the store is unreachable.
pub const MAX_PENDING: usize = 200_000;
/// Most settlements in one batch.
const BATCH: usize = 512;

/// Settlements waiting for the store: sealed batches (each keeps its id across retries) and
/// the open one still filling.
#[derive(Default)]
pub struct Pending {
    pub batches: VecDeque<(u64, Vec<Settlement>)>,
    open: Vec<Settlement>,
}

impl Pending {
    pub fn push_back(&mut self, s: Settlement) {
        self.open.push(s);
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.open.is_empty()
    }

    pub fn len(&self) -> usize {
        self.batches.iter().map(|(_, b)| b.len()).sum::<usize>() + self.open.len()
    }

    /// Closes the open batch into sealed ones of at most [`BATCH`] settlements.
    pub fn seal(&mut self) {
        for chunk in std::mem::take(&mut self.open).chunks(BATCH) {
            self.batches
                .push_back((tollgate_quota::new_batch_id(), chunk.to_vec()));
        }
    }

    /// Drops the oldest `n` settlements (whole batches first); returns how many went.
    pub fn drop_oldest(&mut self, n: usize) -> usize {
        let mut dropped = 0;
        while dropped < n {
            match self.batches.pop_front() {
                Some((_, b)) => dropped += b.len(),
                None => {
                    let k = (n - dropped).min(self.open.len());
                    self.open.drain(..k);
                    dropped += k;
                    break;
                }
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settlement(n: u64) -> Settlement {
        Settlement {
            consumer: format!("c{n}"),
            end: Default::default(),
            reserved: n,
            actual: n,
            window: 0,
            tpm: None,
            usage: None,
            money: Default::default(),
        }
    }

    /// Sealed batches keep their ids across retries; the oldest go first when the buffer is
    /// full, whole batches before the open one.
    #[test]
    fn batches_keep_ids_and_drop_oldest() {
        let mut p = Pending::default();
        for n in 0..(BATCH as u64 + 10) {
            p.push_back(settlement(n));
        }
        p.seal();
        assert_eq!(p.batches.len(), 2);
        let ids: Vec<u64> = p.batches.iter().map(|(id, _)| *id).collect();
        p.push_back(settlement(9_999));
        p.seal();
        assert_eq!(p.batches.len(), 3);
        assert_eq!(p.batches[0].0, ids[0], "a sealed batch keeps its id");
        assert_eq!(p.len(), BATCH + 11);
        assert_eq!(p.drop_oldest(1), BATCH, "a whole batch goes");
        assert_eq!(p.batches[0].0, ids[1]);
        p.push_back(settlement(1));
        assert_eq!(p.drop_oldest(12), 12);
        assert_eq!(p.len(), 0);
        assert!(p.is_empty());
    }
}
