//! Which shard file a memory address belongs to, answerable from a signal handler.
//!
//! Image shards are memory-mapped (`reader`). If a mapped file shrinks while it is mapped (a
//! user truncates or rewrites it in place, a network share drops it) or its disk fails, the
//! next read of a lost page raises SIGBUS, which by default kills the process without a word.
//! This registry lets the binary's SIGBUS handler (`gz-cli`) name the file: every mapping
//! registers its address range and path on open and deregisters on drop.
//!
//! Invariant: [`file_at`] is async-signal-safe. It takes no lock and allocates nothing; it
//! reads one atomic pointer to an immutable snapshot of the regions. Writers (a split opened or
//! dropped) build a new snapshot under a mutex and publish it with one atomic store. Old
//! snapshots are leaked, never freed, because a handler may still be reading one: a snapshot is
//! three words per shard mapped at the time, and one is made per split opened or closed (a
//! Kaggle-size cache, 36 shards of 4,096 images in two splits, leaks about 2 KB per open and
//! close, plus its paths once per open).

use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

#[derive(Clone, Copy)]
struct Region {
    start: usize,
    len: usize,
    /// The file's path bytes (leaked: shared by every snapshot that names the region).
    path: &'static [u8],
}

/// The current snapshot (null: nothing mapped yet).
static CURRENT: AtomicPtr<Vec<Region>> = AtomicPtr::new(std::ptr::null_mut());
/// Serialises writers; holds the same regions as `CURRENT`.
static WRITERS: Mutex<Vec<Region>> = Mutex::new(Vec::new());

fn publish(regions: &[Region]) {
    let snapshot: &'static mut Vec<Region> = Box::leak(Box::new(regions.to_vec()));
    CURRENT.store(snapshot, Ordering::Release);
}

/// Records mappings, each `len` bytes from `start` of the file at `path`: one publication for
/// all of them (a split's shards are registered together, so the snapshots a process leaks grow
/// with the number of splits opened, not with the square of their shards).
pub(crate) fn register<'a>(mappings: impl IntoIterator<Item = (*const u8, usize, &'a Path)>) {
    let mut regions = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let before = regions.len();
    for (start, len, path) in mappings {
        if len == 0 {
            continue;
        }
        let path: &'static [u8] = Box::leak(path.as_os_str().as_encoded_bytes().to_vec().into_boxed_slice());
        regions.push(Region {
            start: start as usize,
            len,
            path,
        });
    }
    if regions.len() != before {
        publish(&regions);
    }
}

/// Forgets the mappings that start at `starts` (called before they are unmapped), in one
/// publication.
pub(crate) fn deregister(starts: impl IntoIterator<Item = *const u8>) {
    let starts: Vec<usize> = starts.into_iter().map(|p| p as usize).collect();
    let mut regions = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let before = regions.len();
    regions.retain(|r| !starts.contains(&r.start));
    if regions.len() != before {
        publish(&regions);
    }
}

/// The path (as raw bytes) of the mapped shard file that holds `addr`, if any.
///
/// Async-signal-safe: meant for a SIGBUS handler (see the module docs).
pub fn file_at(addr: usize) -> Option<&'static [u8]> {
    let snapshot = CURRENT.load(Ordering::Acquire);
    if snapshot.is_null() {
        return None;
    }
    // SAFETY: every pointer stored in CURRENT comes from `Box::leak` and is never freed or
    // mutated after publication.
    let regions: &'static Vec<Region> = unsafe { &*snapshot };
    regions
        .iter()
        .find(|r| addr >= r.start && addr - r.start < r.len)
        .map(|r| r.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_range_is_found_until_it_is_deregistered() {
        let buf = [0u8; 100];
        let start = buf.as_ptr();
        register([(start, buf.len(), Path::new("/x/images-0.shard"))]);
        assert_eq!(file_at(start as usize + 99), Some(&b"/x/images-0.shard"[..]));
        assert_eq!(file_at(start as usize), Some(&b"/x/images-0.shard"[..]));
        assert_eq!(file_at(start as usize + 100), None);
        deregister([start]);
        assert_eq!(file_at(start as usize), None);
    }
}
