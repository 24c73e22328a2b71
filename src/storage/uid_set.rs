//! [`UidSet`]: the uids an export has given, so that a key Redis's SCAN returns twice becomes one
//! line, without holding millions of users (or even millions of `u64`s in a hash set).
//!
//! uids come from a counter, so they sit close together: the set keeps them in blocks of 65,536,
//! each a sorted list of 16-bit offsets while it holds few (2 bytes a uid) and a bitmap of 8 KiB
//! once it holds more (an eighth of a byte a uid). Ten million users registered in turn take about
//! 1.2 MiB; uids scattered by imports cost 2 bytes each plus their block.

use std::collections::HashMap;

/// uids per block: the low 16 bits are the offset within it.
const BLOCK_BITS: u32 = 16;
/// Offsets a block keeps as a list before it turns into a bitmap of the same size (8 KiB).
const LIST_MAX: usize = 4096;
/// Words of a block's bitmap.
const WORDS: usize = (1 << BLOCK_BITS) / 64;

/// A set of uids, compact where they are dense.
#[derive(Default)]
pub struct UidSet {
    blocks: HashMap<u64, Block>,
}

/// The uids of one block of 65,536.
enum Block {
    /// Sorted offsets, while there are at most [`LIST_MAX`].
    List(Vec<u16>),
    /// One bit per offset.
    Bitmap(Box<[u64; WORDS]>),
}

impl UidSet {
    /// Adds `uid`; returns whether it was not there yet.
    pub fn insert(&mut self, uid: u64) -> bool {
        let offset = (uid & ((1 << BLOCK_BITS) - 1)) as u16;
        let block = self
            .blocks
            .entry(uid >> BLOCK_BITS)
            .or_insert_with(|| Block::List(Vec::new()));
        match block {
            Block::List(offsets) => match offsets.binary_search(&offset) {
                Ok(_) => false,
                Err(at) => {
                    offsets.insert(at, offset);
                    if offsets.len() > LIST_MAX {
                        let mut bits = Box::new([0u64; WORDS]);
                        for &o in offsets.iter() {
                            bits[usize::from(o) / 64] |= 1 << (o % 64);
                        }
                        *block = Block::Bitmap(bits);
                    }
                    true
                }
            },
            Block::Bitmap(bits) => {
                let (word, bit) = (usize::from(offset) / 64, 1u64 << (offset % 64));
                let added = bits[word] & bit == 0;
                bits[word] |= bit;
                added
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn a_uid_is_added_once_whether_its_block_is_a_list_or_a_bitmap() {
        let mut set = UidSet::default();
        let mut model = HashSet::new();
        // Dense uids (one block turns into a bitmap), scattered ones, and the extremes.
        let uids = (1..=10_000u64)
            .chain((0..2_000).map(|i| i * 1_000_003))
            .chain([0, u64::MAX, u64::MAX - 1, 1 << 16, (1 << 16) - 1]);
        for uid in uids.clone() {
            assert_eq!(set.insert(uid), model.insert(uid), "{uid}");
        }
        for uid in uids {
            assert!(!set.insert(uid), "{uid} twice");
        }
        assert!(matches!(set.blocks[&0], Block::Bitmap(_)));
        assert!(matches!(
            set.blocks[&(u64::MAX >> BLOCK_BITS)],
            Block::List(_)
        ));
    }
}
