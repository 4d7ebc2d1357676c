//! Unit tests of the shard format: round trip, chunking, corruption and truncation detection,
//! incomplete caches.

use super::*;
use std::fs;

fn cfg() -> serde_json::Value {
    serde_json::json!({"crop": 212, "size": 4, "filter": "area"})
}

fn img(id: u64, n: usize) -> Vec<f16> {
    (0..n)
        .map(|k| f16::from_f32(((id as usize * 7 + k) % 256) as f32 / 255.0))
        .collect()
}

fn lab(id: u64) -> Vec<f32> {
    (0..N_LABELS).map(|k| (id as f32 + k as f32) / 1000.0).collect()
}

/// Writes a cache with `n_train` labelled and `n_test` unlabelled 3×4×4 images.
fn write(root: &Path, n_train: u64, n_test: u64, rps: usize) -> PathBuf {
    let dir = root.join("cache");
    let mut w = CacheWriter::create(&dir, &cfg(), "abc123", rps).unwrap();
    let mut s = w.begin_split("train", [3, 4, 4], true).unwrap();
    for id in 0..n_train {
        s.push(100 + id, &img(100 + id, 48), Some(&lab(100 + id))).unwrap();
    }
    w.end_split(s).unwrap();
    let mut s = w.begin_split("test", [3, 4, 4], false).unwrap();
    for id in 0..n_test {
        s.push(900 + id, &img(900 + id, 48), None).unwrap();
    }
    w.end_split(s).unwrap();
    w.finish(serde_json::json!({"note": "unit"})).unwrap()
}

#[test]
fn round_trip() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 10, 3, 4);
    let c = Cache::open(&dir).unwrap();
    // (the writer's record of its holder is not part of the cache)
    assert_eq!(crate::inventory::foreign_files(&dir), Vec::<String>::new());
    assert_eq!(c.config_hash(), "abc123");
    assert_eq!(c.prep_config(), &cfg());
    assert_eq!(c.dir(), dir.as_path());
    assert_eq!(c.extra()["note"], "unit");
    let tr = c.train().unwrap();
    assert_eq!(tr.len(), 10);
    assert_eq!(tr.shape(), [3, 4, 4]);
    assert_eq!(tr.ids(), (100..110).collect::<Vec<_>>().as_slice());
    for i in 0..10 {
        let id = 100 + i as u64;
        assert_eq!(tr.image(i), img(id, 48).as_slice());
        assert_eq!(tr.label(i).unwrap(), lab(id).as_slice());
        assert_eq!(tr.row_of(id), Some(i));
        assert_eq!(tr.locate(id), Some((i / 4, i % 4)));
    }
    assert_eq!(tr.labels().unwrap().len(), 370);
    assert_eq!(tr.images(4..8).len(), 4 * 48);
    assert_eq!(&tr.images(4..8)[48..96], img(105, 48).as_slice());
    let chunks: Vec<_> = tr.chunks(3).collect();
    assert_eq!(chunks, vec![0..3, 3..4, 4..7, 7..8, 8..10]);
    let te = c.test().unwrap();
    assert_eq!(te.len(), 3);
    assert!(te.labels().is_none());
    assert!(te.label(0).is_none());
    assert_eq!(te.image(2), img(902, 48).as_slice());
    assert_eq!(c.verify().unwrap(), 3 + 2 + 1 + 1);
    // shard files: 3 train (4+4+2), 1 test
    assert!(dir.join("train-00002.shard").exists());
    assert!(!dir.join("train-00003.shard").exists());
}

#[test]
#[should_panic(expected = "cross a shard boundary")]
fn range_across_shards_panics() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 10, 0, 4);
    let c = Cache::open(&dir).unwrap();
    let _ = c.train().unwrap().images(3..5);
}

#[test]
fn empty_split_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 2, 0, 4);
    let c = Cache::open(&dir).unwrap();
    assert_eq!(c.test().unwrap().len(), 0);
    assert!(c.test().unwrap().is_empty());
    assert_eq!(c.test().unwrap().chunks(8).count(), 0);
}

#[test]
fn incomplete_cache_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 3, 1, 4);
    fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
    let e = Cache::open(&dir).unwrap_err();
    assert!(matches!(e, ShardError::Incomplete { .. }), "{e}");
    assert!(e.to_string().contains("no manifest.json"));
}

/// An incomplete cache (no manifest) at the cache's place is replaced by a new one, unless it
/// holds files the writer does not write: then the writer refuses before any work, naming them.
#[test]
fn an_incomplete_cache_holding_a_users_files_is_not_replaced() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 3, 1, 4);
    fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    let e = CacheWriter::create(&dir, &cfg(), "abc123", 4).unwrap_err().to_string();
    assert!(e.contains("(notes.txt), which replacing it would delete"), "{e}");
    assert!(dir.join("notes.txt").exists() && dir.join("train-00000.shard").exists());
    // its own files only: replaced
    fs::remove_file(dir.join("notes.txt")).unwrap();
    let mut w = CacheWriter::create(&dir, &cfg(), "abc123", 4).unwrap();
    let mut s = w.begin_split("train", [3, 4, 4], true).unwrap();
    s.push(7, &img(7, 48), Some(&lab(7))).unwrap();
    w.end_split(s).unwrap();
    let c = Cache::open(&w.finish(serde_json::Value::Null).unwrap()).unwrap();
    assert_eq!(c.train().unwrap().ids(), [7]);
}

#[test]
fn unfinished_writer_leaves_nothing_complete() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("cache");
    {
        let w = CacheWriter::create(&dir, &cfg(), "h", 4).unwrap();
        let mut s = w.begin_split("train", [3, 4, 4], true).unwrap();
        s.push(1, &img(1, 48), Some(&lab(1))).unwrap();
        assert!(w.tmp_dir().exists());
        // dropped without finish (as on an error)
    }
    assert!(!dir.exists());
    assert_eq!(
        fs::read_dir(t.path()).unwrap().count(),
        0,
        "temporary directory removed"
    );
    assert!(Cache::open(&dir).is_err());
}

#[test]
fn killed_writer_tmp_dir_is_never_a_cache_and_is_cleaned() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("cache");
    // Simulate a writer killed mid-write by a process that no longer exists.
    let stale = t.path().join(".cache.tmp-4000000000");
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("train-00000.shard"), [0u8; 100]).unwrap();
    assert!(Cache::open(&stale).is_err());
    assert!(Cache::open(&dir).is_err());
    write(t.path(), 1, 1, 4);
    assert!(!stale.exists(), "stale temp dir removed by the next writer");
    assert!(Cache::open(&dir).is_ok());
}

#[test]
fn existing_complete_cache_is_not_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 1, 1, 4);
    assert!(matches!(
        CacheWriter::create(&dir, &cfg(), "abc123", 4),
        Err(ShardError::Invalid(_))
    ));
}

fn corrupt(f: impl FnOnce(&mut Vec<u8>), file: &str) -> String {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 6, 2, 4);
    let p = dir.join(file);
    let mut b = fs::read(&p).unwrap();
    f(&mut b);
    // published files are read-only by convention, not permission; rewrite in place
    fs::write(&p, &b).unwrap();
    match Cache::open(&dir).and_then(|c| c.verify()) {
        Ok(_) => panic!("corruption of {file} not detected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_magic_detected() {
    let e = corrupt(|b| b[0] = b'X', "train-00000.shard");
    assert!(e.contains("wrong magic") && e.contains("train-00000.shard"), "{e}");
}

#[test]
fn wrong_version_detected() {
    let e = corrupt(|b| b[8] = 99, "train-00001.shard");
    assert!(e.contains("format version 99"), "{e}");
}

#[test]
fn header_bitflip_detected() {
    let e = corrupt(|b| b[100] ^= 1, "test-00000.shard");
    assert!(e.contains("header checksum mismatch"), "{e}");
}

#[test]
fn truncation_detected() {
    let e = corrupt(|b| b.truncate(b.len() - 2), "train-00000.shard");
    assert!(e.contains("truncated"), "{e}");
    let e = corrupt(|b| b.truncate(50), "train-00000.shard");
    assert!(e.contains("truncated"), "{e}");
    let e = corrupt(|b| b.push(0), "train.labels");
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn payload_bitflip_detected_by_verify() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 6, 2, 4);
    let p = dir.join("train-00001.shard");
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n - 1] ^= 0x40;
    fs::write(&p, &b).unwrap();
    // open does not read payloads (instant), verify does
    let c = Cache::open(&dir).unwrap();
    let e = c.verify().unwrap_err().to_string();
    assert!(
        e.contains("checksum mismatch") && e.contains("train-00001.shard"),
        "{e}"
    );
}

#[test]
fn label_and_index_corruption_detected_on_open() {
    let e = corrupt(|b| *b.last_mut().unwrap() ^= 1, "train.labels");
    assert!(e.contains("checksum mismatch"), "{e}");
    let e = corrupt(|b| *b.last_mut().unwrap() ^= 1, "train.index");
    assert!(e.contains("checksum mismatch"), "{e}");
}

#[test]
fn swapped_shard_detected() {
    // a valid shard from another cache (different config hash) in place of ours
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 6, 2, 4);
    let other = t.path().join("other");
    let mut w = CacheWriter::create(&other, &cfg(), "zzz", 4).unwrap();
    let mut s = w.begin_split("train", [3, 4, 4], true).unwrap();
    for id in 0..4 {
        s.push(id, &img(id, 48), Some(&lab(id))).unwrap();
    }
    w.end_split(s).unwrap();
    let other = w.finish(serde_json::Value::Null).unwrap();
    fs::copy(other.join("train-00000.shard"), dir.join("train-00000.shard")).unwrap();
    let e = Cache::open(&dir).unwrap_err().to_string();
    assert!(e.contains("config hash zzz"), "{e}");
}

#[test]
fn bad_manifest_detected() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 2, 1, 4);
    fs::write(dir.join(MANIFEST_FILE), b"{ not json").unwrap();
    let e = Cache::open(&dir).unwrap_err().to_string();
    assert!(e.contains("bad manifest"), "{e}");
}

#[test]
fn writer_rejects_bad_rows() {
    let t = tempfile::tempdir().unwrap();
    let w = CacheWriter::create(&t.path().join("c"), &cfg(), "h", 4).unwrap();
    let mut s = w.begin_split("train", [3, 4, 4], true).unwrap();
    assert!(s.push(1, &img(1, 47), Some(&lab(1))).is_err());
    assert!(s.push(1, &img(1, 48), None).is_err());
    assert!(s.push(1, &img(1, 48), Some(&[0.0; 36])).is_err());
    s.push(1, &img(1, 48), Some(&lab(1))).unwrap();
    assert!(matches!(
        s.push(1, &img(1, 48), Some(&lab(1))),
        Err(ShardError::DuplicateId { .. })
    ));
    assert!(w.begin_split("bad name", [3, 4, 4], false).is_err());
}

#[test]
fn cache_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cache>();
    assert_send_sync::<Split>();
}

/// The split fingerprint follows the content (images, ids, labels, order), not the place or
/// the time a cache was written.
#[test]
fn split_fingerprints_follow_the_content() {
    let t = tempfile::tempdir().unwrap();
    let a = Cache::open(&write(&t.path().join("a"), 10, 3, 4)).unwrap();
    let b = Cache::open(&write(&t.path().join("b"), 10, 3, 4)).unwrap();
    let fa = a.split_fingerprint("train").unwrap();
    assert_eq!(fa.len(), 16);
    assert_eq!(Some(fa.clone()), b.split_fingerprint("train"), "same content elsewhere");
    assert_ne!(a.split_fingerprint("test"), a.split_fingerprint("train"));
    assert!(a.split_fingerprint("nope").is_none());
    let c = Cache::open(&write(&t.path().join("c"), 9, 3, 4)).unwrap();
    assert_ne!(Some(fa.clone()), c.split_fingerprint("train"), "a row fewer");
    // one label changed
    let dir = t.path().join("d").join("cache");
    let mut w = CacheWriter::create(&dir, &cfg(), "abc123", 4).unwrap();
    let mut s = w.begin_split("train", [3, 4, 4], true).unwrap();
    for id in 0..10u64 {
        let mut l = lab(100 + id);
        if id == 7 {
            l[3] += 0.5;
        }
        s.push(100 + id, &img(100 + id, 48), Some(&l)).unwrap();
    }
    w.end_split(s).unwrap();
    let d = Cache::open(&w.finish(serde_json::json!({})).unwrap()).unwrap();
    assert_ne!(Some(fa), d.split_fingerprint("train"), "a label changed");
}

#[test]
fn mapped_shards_are_named_by_address_while_open() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), 10, 3, 4);
    let c = Cache::open(&dir).unwrap();
    let tr = c.train().unwrap();
    let in_third_shard = tr.image(9).as_ptr() as usize + 5;
    let want = dir.join("train-00002.shard");
    assert_eq!(
        mapped::file_at(in_third_shard),
        Some(want.as_os_str().as_encoded_bytes())
    );
    let in_test = c.test().unwrap().image(0).as_ptr() as usize;
    assert_eq!(
        mapped::file_at(in_test),
        Some(dir.join("test-00000.shard").as_os_str().as_encoded_bytes())
    );
    drop(c);
    // (another test may map a file at the freed address meanwhile, never one of this folder's)
    assert_ne!(
        mapped::file_at(in_third_shard),
        Some(want.as_os_str().as_encoded_bytes()),
        "a closed cache's ranges are forgotten"
    );
}

/// Damage to any file of a cache, and manifest fields set to extremes (counts, shapes, rows
/// per shard, CRCs, file names): opening, verifying and reading every row never panics, and a
/// cache that still opens serves only rows inside its files. `GZ_FUZZ=N` runs N mutations of
/// each kind (default 40).
#[test]
fn damaged_caches_never_panic() {
    let per: usize = std::env::var("GZ_FUZZ").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let t = tempfile::tempdir().unwrap();
    let good = write(t.path(), 10, 3, 4);
    let files: Vec<String> = {
        let mut v: Vec<String> = fs::read_dir(&good)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let originals: Vec<Vec<u8>> = files.iter().map(|f| fs::read(good.join(f)).unwrap()).collect();
    let mut state = 0xd1b5_4a32_d192_ed03u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let exercise = |dir: &Path| {
        let Ok(c) = Cache::open(dir) else { return };
        let _ = c.verify();
        let _ = c.split_fingerprint("train");
        let _ = c.split_data_fingerprint("test");
        for name in ["train", "test"] {
            let Some(s) = c.split(name) else { continue };
            let n = s.image_len();
            for i in 0..s.len() {
                assert_eq!(s.image(i).len(), n);
                let _ = s.label(i);
            }
            for r in s.chunks(3) {
                assert_eq!(s.images(r.clone()).len(), r.len() * n);
            }
            for &id in s.ids() {
                let _ = s.locate(id);
            }
            let _ = s.labels();
        }
    };
    let extremes = [
        serde_json::json!(0),
        serde_json::json!(1),
        serde_json::json!(3),
        serde_json::json!(u32::MAX),
        serde_json::json!(u64::MAX),
        serde_json::json!(1u64 << 40),
        serde_json::json!(-1),
        serde_json::json!("../cache/train.index"),
        serde_json::json!("manifest.json"),
        serde_json::json!("/etc/passwd"),
        serde_json::json!(null),
        serde_json::json!([]),
    ];
    fn leaves(v: &mut serde_json::Value, out: &mut Vec<*mut serde_json::Value>) {
        match v {
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| leaves(x, out)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|x| leaves(x, out)),
            leaf => out.push(leaf as *mut _),
        }
    }
    for k in 0..per * files.len() * 2 {
        let dir = t.path().join(format!("m{k}"));
        fs::create_dir_all(&dir).unwrap();
        for (f, b) in files.iter().zip(&originals) {
            fs::write(dir.join(f), b).unwrap();
        }
        let fi = k % files.len();
        let mut b = originals[fi].clone();
        // (every other round of the files: field by field, else byte damage as the others)
        if files[fi] == MANIFEST_FILE && (k / files.len()) % 2 == 0 {
            let mut v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            for _ in 0..(1 + next() % 2) {
                let mut ls = Vec::new();
                leaves(&mut v, &mut ls);
                let p = ls[(next() as usize) % ls.len()];
                // SAFETY: `ls` points into `v`, which is not otherwise touched until the write
                unsafe { *p = extremes[(next() as usize) % extremes.len()].clone() };
            }
            b = serde_json::to_vec_pretty(&v).unwrap();
        } else {
            for _ in 0..(1 + next() % 3) {
                let i = (next() as usize) % b.len().max(1);
                match next() % 4 {
                    0 if i < b.len() => b[i] = next() as u8,
                    1 if i < b.len() => b[i] ^= 1 << (next() % 8),
                    2 => b.truncate(i),
                    _ => b.splice(i..i, (0..1 + next() % 9).map(|_| next() as u8)).for_each(drop),
                }
            }
        }
        fs::write(dir.join(&files[fi]), &b).unwrap();
        if std::panic::catch_unwind(|| exercise(&dir)).is_err() {
            panic!("{} damaged in {} panicked a reader", files[fi], dir.display());
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
