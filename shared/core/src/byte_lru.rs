//! A least-recently-used map bounded by the total size of its values, safe to share.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Mutex;

pub struct ByteLru<K: Hash + Eq, V> {
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K: Hash + Eq, V> {
    entries: lru::LruCache<K, (V, usize)>,
    bytes: usize,
    max_bytes: usize,
}

impl<K: Hash + Eq, V: Clone> ByteLru<K, V> {
    pub fn new(max_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner { entries: lru::LruCache::unbounded(), bytes: 0, max_bytes }) }
    }

    /// The value under `key`, now the most recently used.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.lock().ok()?.entries.get(key).map(|(v, _)| v.clone())
    }

    /// Keeps `value` (of `size` bytes), evicting the least recently used entries beyond the
    /// bound; a value larger than the whole bound is not kept.
    pub fn put(&self, key: K, value: V, size: usize) {
        let Ok(mut inner) = self.inner.lock() else { return };
        if size > inner.max_bytes {
            return;
        }
        inner.bytes += size;
        if let Some((_, old)) = inner.entries.put(key, (value, size)) {
            inner.bytes -= old;
        }
        while inner.bytes > inner.max_bytes {
            match inner.entries.pop_lru() {
                Some((_, (_, s))) => inner.bytes -= s,
                None => break,
            }
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.entries.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_byte_bound_evicting_the_least_recently_used() {
        let lru = ByteLru::new(10);
        lru.put("a", 1, 4);
        lru.put("b", 2, 4);
        assert_eq!(lru.get(&"a"), Some(1));
        lru.put("c", 3, 4);
        assert!(lru.bytes() <= 10);
        assert_eq!((lru.get(&"a"), lru.get(&"b"), lru.get(&"c")), (Some(1), None, Some(3)));
        lru.put("a", 9, 2);
        assert_eq!((lru.get(&"a"), lru.bytes()), (Some(9), 6), "replacing adjusts the size");
        lru.put("huge", 0, 11);
        assert_eq!(lru.get(&"huge"), None);
    }
}
