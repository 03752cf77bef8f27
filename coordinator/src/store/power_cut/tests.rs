//! The simulated disk's own tests: what a cut keeps of one file, of a
//! directory of files, and where the fuse blows.

use super::*;
use crate::store::log::fs::LogDir;

fn disk_with(synced: &[u8], unsynced: &[(u64, &[u8])]) -> (SimDisk, SimFile) {
    let disk = SimDisk::new();
    let file = disk.attach();
    file.write(0, synced).unwrap();
    file.sync_data().unwrap();
    for (offset, data) in unsynced {
        file.write(*offset, data).unwrap();
    }
    (disk, file)
}

fn image(disk: &SimDisk) -> Vec<u8> {
    let file = disk.attach();
    let mut out = vec![0; usize::try_from(file.len().unwrap()).unwrap()];
    file.read(0, &mut out).unwrap();
    out
}

#[test]
fn a_cut_keeps_what_was_synced_and_drops_the_rest() {
    let (disk, file) = disk_with(&[1; 1024], &[(0, &[2; 512]), (1024, &[3; 512])]);
    let mut read = [0; 4];
    file.read(1020, &mut read).unwrap();
    assert_eq!(read, [1, 1, 1, 1], "the process reads its own writes");
    assert_eq!(file.len().unwrap(), 1536);
    disk.cut(Survivors::None);
    assert!(
        file.read(0, &mut read).is_err(),
        "a dead handle still reads"
    );
    assert!(file.write(0, &[9]).is_err(), "a dead handle still writes");
    assert_eq!(image(&disk), vec![1; 1024]);
}

#[test]
fn the_fuse_blows_on_the_chosen_call_and_fails_it() {
    let (disk, file) = disk_with(&[1; 512], &[]);
    disk.arm(2, Survivors::None);
    file.write(0, &[2; 512]).unwrap();
    assert_eq!((disk.ops(), disk.syncs()), (3, 1));
    assert!(file.sync_data().is_err(), "the sync the power failed in");
    assert_eq!(disk.syncs(), 1, "a failed sync counted");
    assert!(disk.is_off());
    assert_eq!(image(&disk), vec![1; 512]);

    let file = disk.attach();
    disk.arm_at_sync(2, Survivors::None);
    for byte in [3, 4] {
        file.write(0, &[byte; 512]).unwrap();
    }
    file.sync_data().unwrap();
    file.write(0, &[5; 512]).unwrap();
    assert!(file.sync_data().is_err(), "the second sync went through");
    assert_eq!(image(&disk), vec![4; 512]);
}

#[test]
fn a_torn_write_keeps_a_whole_sector_prefix_of_itself() {
    for seed in 0..64 {
        let (disk, _file) = disk_with(&[0; 2048], &[(0, &[7; 2048])]);
        disk.cut(Survivors::TornPrefix { seed });
        let after = image(&disk);
        let kept = after.iter().take_while(|b| **b == 7).count();
        assert_eq!(
            kept % SECTOR as usize,
            0,
            "seed {seed}: torn inside a sector"
        );
        assert!(
            after[kept..].iter().all(|b| *b == 0),
            "seed {seed}: not a prefix"
        );
    }
}

#[test]
fn a_reordering_cache_keeps_any_set_of_whole_sectors() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let (disk, _file) = disk_with(&[0; 2048], &[(0, &[7; 2048])]);
        disk.cut(Survivors::AnySectors { seed });
        let after = image(&disk);
        let kept: Vec<bool> = after.chunks(SECTOR as usize).map(|s| s[0] == 7).collect();
        for sector in after.chunks(SECTOR as usize) {
            assert!(
                sector.iter().all(|b| *b == sector[0]),
                "seed {seed}: torn sector"
            );
        }
        seen.insert(kept);
    }
    assert!(
        seen.len() > 4,
        "only {} sector sets in 64 seeds",
        seen.len()
    );
}

/// The names on a mounted directory and each file's contents.
fn files(dir: &SimDir) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in dir.list().unwrap() {
        let file = dir.open(&name).unwrap();
        let mut bytes = vec![0; usize::try_from(file.len().unwrap()).unwrap()];
        file.read_exact_at(&mut bytes, 0).unwrap();
        out.push((name, bytes));
    }
    out
}

#[test]
fn a_created_file_lasts_a_cut_only_once_the_directory_was_synced() {
    let disk = SimDisk::new();
    let dir = disk.mount();
    let kept = dir.create("kept").unwrap();
    kept.write_all_at(b"kept", 0).unwrap();
    kept.sync_data().unwrap();
    dir.sync().unwrap();
    let lost = dir.create("lost").unwrap();
    lost.write_all_at(b"lost", 0).unwrap();
    lost.sync_data().unwrap();
    assert!(dir.create("lost").is_err(), "created twice");
    disk.cut(Survivors::None);
    assert!(dir.list().is_err(), "a dead directory handle still lists");
    assert!(kept.sync_data().is_err(), "a dead file handle still syncs");
    let dir = disk.mount();
    assert_eq!(files(&dir), [("kept".to_owned(), b"kept".to_vec())]);
}

#[test]
fn a_removed_file_is_back_with_its_durable_contents_after_a_cut_before_the_directory_sync() {
    let disk = SimDisk::new();
    let dir = disk.mount();
    let file = dir.create("old").unwrap();
    file.write_all_at(b"synced", 0).unwrap();
    file.sync_data().unwrap();
    dir.sync().unwrap();
    file.write_all_at(b"cached", 0).unwrap();
    dir.remove("old").unwrap();
    assert!(dir.list().unwrap().is_empty());
    let mut read = [0; 6];
    file.read_exact_at(&mut read, 0).unwrap();
    assert_eq!(&read, b"cached", "an open handle reads a removed file");
    disk.cut(Survivors::None);
    let dir = disk.mount();
    assert_eq!(files(&dir), [("old".to_owned(), b"synced".to_vec())]);

    dir.remove("old").unwrap();
    dir.sync().unwrap();
    disk.cut(Survivors::All);
    assert!(disk.mount().list().unwrap().is_empty());
}

#[test]
fn unsynced_creations_and_removals_land_as_an_in_order_prefix() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..32 {
        let disk = SimDisk::new();
        let dir = disk.mount();
        for name in ["a", "b", "c"] {
            dir.create(name).unwrap();
        }
        dir.remove("a").unwrap();
        disk.cut(Survivors::AnySectors { seed });
        let names = disk.mount().list().unwrap();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let prefixes = [&[][..], &["a"], &["a", "b"], &["a", "b", "c"], &["b", "c"]];
        assert!(
            prefixes.contains(&names.as_slice()),
            "seed {seed}: {names:?} is not a prefix"
        );
        seen.insert(names.join(","));
    }
    assert!(seen.len() > 2, "only {seen:?} in 32 seeds");
}

#[test]
fn the_fuse_counts_the_writes_and_syncs_of_every_file_and_the_directory() {
    let disk = SimDisk::new();
    let dir = disk.mount();
    let a = dir.create("a").unwrap();
    let b = dir.create("b").unwrap();
    disk.arm(4, Survivors::All);
    a.write_all_at(&[1; 512], 0).unwrap();
    b.write_all_at(&[2; 512], 0).unwrap();
    a.sync_data().unwrap();
    assert_eq!((disk.ops(), disk.syncs()), (3, 1));
    assert!(
        dir.sync().is_err(),
        "the directory sync the power failed in"
    );
    assert!(disk.is_off());
    // Everything in the cache landed, the directory's changes too.
    let dir = disk.mount();
    assert_eq!(
        files(&dir),
        [
            ("a".to_owned(), vec![1; 512]),
            ("b".to_owned(), vec![2; 512])
        ]
    );

    disk.arm_at_sync(2, Survivors::None);
    let a = dir.open("a").unwrap();
    a.write_all_at(&[3; 512], 0).unwrap();
    dir.sync().unwrap();
    a.write_all_at(&[4; 512], 0).unwrap();
    assert!(a.sync_data().is_err(), "the second sync went through");
    let dir = disk.mount();
    assert_eq!(files(&dir)[0], ("a".to_owned(), vec![1; 512]));
}

#[test]
fn a_failed_sync_loses_the_unsynced_writes_with_the_power_on() {
    let (disk, file) = disk_with(&[1; 512], &[(0, &[2; 512])]);
    disk.fail_at_sync(1);
    assert!(file.sync_data().is_err(), "the sync did not fail");
    assert!(!disk.is_off(), "the power went");
    let mut read = [0; 4];
    file.read(0, &mut read).unwrap();
    assert_eq!(read, [1; 4], "the lost write still reads");
    file.write(512, &[3; 512]).unwrap();
    file.sync_data().unwrap();
    disk.cut(Survivors::All);
    let mut want = vec![1; 512];
    want.extend_from_slice(&[3; 512]);
    assert_eq!(image(&disk), want);
}
