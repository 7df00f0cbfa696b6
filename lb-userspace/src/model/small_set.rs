//! A set that is small in memory while it is small in size.
//!
//! Most Services have one EndpointSlice and a few frontends, and the model keeps a set
//! of each per Service. A `BTreeSet`'s first node holds eleven slots (about 540 bytes
//! for one object name): at 100 000 Services that was 80 MB for sets of one. Up to
//! [`INLINE`] elements live in a sorted vector sized exactly; past that, a `BTreeSet`
//! keeps inserts logarithmic.

use std::collections::BTreeSet;

const INLINE: usize = 32;

#[derive(Debug, Clone)]
pub enum SmallSet<T> {
    Sorted(Vec<T>),
    Tree(BTreeSet<T>),
}

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self::Sorted(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    /// Adds `value`; false if it was there.
    pub fn insert(&mut self, value: T) -> bool {
        match self {
            Self::Sorted(items) => match items.binary_search(&value) {
                Ok(_) => false,
                Err(at) if items.len() < INLINE => {
                    items.reserve_exact(1);
                    items.insert(at, value);
                    true
                }
                Err(_) => {
                    let mut tree: BTreeSet<T> = std::mem::take(items).into_iter().collect();
                    tree.insert(value);
                    *self = Self::Tree(tree);
                    true
                }
            },
            Self::Tree(tree) => tree.insert(value),
        }
    }

    /// Removes `value`; false if it was not there.
    pub fn remove(&mut self, value: &T) -> bool {
        match self {
            Self::Sorted(items) => match items.binary_search(value) {
                Ok(at) => {
                    items.remove(at);
                    true
                }
                Err(_) => false,
            },
            Self::Tree(tree) => tree.remove(value),
        }
    }

    pub fn contains(&self, value: &T) -> bool {
        match self {
            Self::Sorted(items) => items.binary_search(value).is_ok(),
            Self::Tree(tree) => tree.contains(value),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Sorted(items) => items.len(),
            Self::Tree(tree) => tree.len(),
        }
    }

    /// In order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &T> + '_> {
        match self {
            Self::Sorted(items) => Box::new(items.iter()),
            Self::Tree(tree) => Box::new(tree.iter()),
        }
    }
}

impl<T: Ord> FromIterator<T> for SmallSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut set = Self::default();
        for value in iter {
            set.insert(value);
        }
        set
    }
}

impl<'a, T: Ord> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = Box<dyn Iterator<Item = &'a T> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answers as a `BTreeSet` through inserts and removals that cross the
    /// inline limit both ways.
    #[test]
    fn behaves_as_a_btree_set() {
        let mut small = SmallSet::default();
        let mut tree = BTreeSet::new();
        let mut x = 7u32;
        for step in 0..4000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let value = (x >> 8) % 80;
            if step % 3 == 0 {
                assert_eq!(small.remove(&value), tree.remove(&value));
            } else {
                assert_eq!(small.insert(value), tree.insert(value));
            }
            assert_eq!(small.len(), tree.len());
            assert_eq!(small.contains(&value), tree.contains(&value));
            assert!(small.iter().eq(tree.iter()));
        }
        assert!(matches!(small, SmallSet::Tree(_)));
        let one: SmallSet<u32> = [3].into_iter().collect();
        match one {
            SmallSet::Sorted(items) => assert_eq!(items.capacity(), 1),
            SmallSet::Tree(_) => panic!("one element in a tree"),
        }
    }
}
