//! Round trips and every kind of damage: flipped bytes, truncation, appended garbage,
//! wrong key.

use std::sync::atomic::AtomicBool;

use super::*;

const SEG: u32 = 1024;

fn header(compression: Compression) -> Header {
    Header {
        database: "app".into(),
        backend: "sqlite".into(),
        image: "sqlite".into(),
        created: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        compression,
        segment_size: SEG,
        encryption: None,
        globals: None,
    }
}

fn data(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] % 64)
        .collect()
}

fn pack(plain: &[u8], key: Option<&Key>, compression: Compression) -> Vec<u8> {
    let settings = Settings {
        header: header(compression),
        key,
        compression,
        level: compression.default_level(),
        threads: 2,
        check_with: Some(KeyRing::new(key.into_iter().cloned().collect())),
        globals: None,
    };
    let (out, stats) = write_archive(plain, Vec::new(), settings, &AtomicBool::new(false)).unwrap();
    assert!(matches!(stats.checked, Some(Ok(()))), "{:?}", stats.checked);
    assert_eq!(stats.raw_bytes, plain.len() as u64);
    assert_eq!(stats.stored_bytes, out.len() as u64);
    assert_eq!(stats.sha256, sha256_of(&out[..]).unwrap().0);
    out
}

fn unpack(archive: &[u8], keys: &KeyRing) -> Result<Vec<u8>, ArchiveError> {
    read_archive(archive, keys, Vec::new(), &AtomicBool::new(false)).map(|(out, _, _)| out)
}

#[test]
fn round_trip_every_codec_with_and_without_encryption() {
    let key = Key::random().unwrap();
    let ring = KeyRing::new(vec![key.clone()]);
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        for n in [0usize, 1, SEG as usize, 5 * SEG as usize + 3, 300_000] {
            let plain = data(n);
            for k in [Some(&key), None] {
                let archive = pack(&plain, k, compression);
                assert_eq!(
                    unpack(&archive, &ring).unwrap(),
                    plain,
                    "{compression:?} {n} encrypted={}",
                    k.is_some()
                );
            }
        }
    }
}

#[test]
fn encrypted_archive_holds_no_plaintext() {
    let key = Key::random().unwrap();
    let plain = b"SECRET-ROW-".repeat(10_000);
    let archive = pack(&plain, Some(&key), Compression::None);
    assert!(!archive.windows(11).any(|w| w == b"SECRET-ROW-"));
}

/// Every byte of the header and a spread of body bytes, flipped one at a time.
#[test]
fn any_flipped_byte_is_detected() {
    let key = Key::random().unwrap();
    let ring = KeyRing::new(vec![key.clone()]);
    for k in [Some(&key), None] {
        let archive = pack(&data(20_000), k, Compression::Gzip);
        let header_end = 13 + u32::from_be_bytes(archive[9..13].try_into().unwrap()) as usize;
        let positions = (0..header_end)
            .chain((header_end..archive.len()).step_by(37))
            .chain([archive.len() - 1]);
        for pos in positions {
            let mut bad = archive.clone();
            bad[pos] ^= 0x20;
            match unpack(&bad, &ring) {
                Err(e) => assert!(e.is_verification(), "byte {pos}: {e}"),
                Ok(_) => panic!("flipped byte {pos} accepted (encrypted={})", k.is_some()),
            }
        }
    }
}

#[test]
fn truncation_at_any_segment_boundary_or_inside_is_detected() {
    let key = Key::random().unwrap();
    let ring = KeyRing::new(vec![key.clone()]);
    let archive = pack(&data(40_000), Some(&key), Compression::None);
    let header_end = 13 + u32::from_be_bytes(archive[9..13].try_into().unwrap()) as usize;
    let stored = SEG as usize + crypto::TAG_LEN;
    let boundaries = (header_end..archive.len()).step_by(stored);
    for cut in boundaries
        .clone()
        .chain(boundaries.map(|b| b + 100))
        .chain([5, 12, header_end - 1])
    {
        if cut >= archive.len() {
            continue;
        }
        let err = unpack(&archive[..cut], &ring).expect_err(&format!("cut at {cut} accepted"));
        assert!(err.is_verification(), "cut at {cut}: {err}");
    }
    // Cut exactly at a boundary: reported as truncation, not as damage.
    let err = unpack(&archive[..header_end + 2 * stored], &ring).unwrap_err();
    assert!(
        matches!(err, ArchiveError::Truncated { segments: 2 }),
        "{err}"
    );
}

#[test]
fn appended_garbage_is_detected() {
    let key = Key::random().unwrap();
    let ring = KeyRing::new(vec![key.clone()]);
    for extra in [1usize, 16, 17, SEG as usize + 16, 5000] {
        let mut archive = pack(&data(10_000), Some(&key), Compression::Zstd);
        archive.extend(std::iter::repeat_n(0xAB, extra));
        assert!(
            unpack(&archive, &ring).unwrap_err().is_verification(),
            "{extra} bytes appended"
        );
    }
}

#[test]
fn wrong_key_names_both_key_ids() {
    let a = Key::random().unwrap();
    let b = Key::random().unwrap();
    let archive = pack(&data(100), Some(&a), Compression::Gzip);
    let err = unpack(&archive, &KeyRing::new(vec![b.clone()])).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("made with key {}", a.id()))
            && msg.contains(&format!("you have key {}", b.id())),
        "{msg}"
    );
    assert!(err.is_verification());
    // With the old key among decryption keys, it opens.
    assert!(unpack(&archive, &KeyRing::new(vec![b, a])).is_ok());
}

#[test]
fn not_an_archive_and_future_versions_are_refused() {
    assert!(matches!(
        unpack(b"PGDMP...", &KeyRing::default()),
        Err(ArchiveError::NotAnArchive)
    ));
    let mut archive = pack(&data(10), None, Compression::None);
    archive[8] = 4;
    assert!(matches!(
        unpack(&archive, &KeyRing::default()),
        Err(ArchiveError::UnsupportedVersion(4))
    ));
}

#[test]
fn cancellation_stops_writing() {
    let settings = Settings {
        header: header(Compression::Gzip),
        key: None,
        compression: Compression::Gzip,
        level: 1,
        threads: 1,
        check_with: None,
        globals: None,
    };
    let err = write_archive(
        &data(10_000)[..],
        Vec::new(),
        settings,
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::Cancelled));
}

#[test]
fn inline_check_reports_a_key_it_cannot_use() {
    let key = Key::random().unwrap();
    let settings = Settings {
        header: header(Compression::Zstd),
        key: Some(&key),
        compression: Compression::Zstd,
        level: 3,
        threads: 2,
        check_with: Some(KeyRing::default()),
        globals: None,
    };
    let (_, stats) = write_archive(
        &data(5000)[..],
        Vec::new(),
        settings,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(
        matches!(stats.checked, Some(Err(ArchiveError::WrongKey { .. }))),
        "{:?}",
        stats.checked
    );
}

fn pack_with_globals(plain: &[u8], globals: &[u8], key: Option<&Key>) -> Vec<u8> {
    let compression = Compression::Zstd;
    let mut h = header(compression);
    h.globals = Some(GlobalsSection {
        format: GlobalsFormat::PgJsonV1,
        bytes: globals.len() as u64,
    });
    let settings = Settings {
        header: h,
        key,
        compression,
        level: compression.default_level(),
        threads: 2,
        check_with: Some(KeyRing::new(key.into_iter().cloned().collect())),
        globals: Some(GlobalsBytes(zeroize::Zeroizing::new(globals.to_vec()))),
    };
    let (out, stats) = write_archive(plain, Vec::new(), settings, &AtomicBool::new(false)).unwrap();
    assert!(matches!(stats.checked, Some(Ok(()))), "{:?}", stats.checked);
    // The image size, as the manifest records it, leaves the section out.
    assert_eq!(stats.raw_bytes, plain.len() as u64);
    out
}

#[test]
fn a_globals_section_comes_back_apart_from_the_image_in_a_version_2_archive() {
    let key = Key::random().unwrap();
    let ring = KeyRing::new(vec![key.clone()]);
    let globals = br#"{"roles":[]}"#;
    for n in [0usize, 10, 3 * SEG as usize + 1] {
        let plain = data(n);
        for k in [Some(&key), None] {
            let archive = pack_with_globals(&plain, globals, k);
            assert_eq!(archive[8], format::VERSION_GLOBALS);
            let read = read_archive_gated(
                &archive[..],
                &ring,
                Vec::new(),
                &AtomicBool::new(false),
                |_| Ok(()),
            )
            .unwrap();
            assert_eq!(read.sink, plain);
            assert_eq!(read.raw, n as u64);
            assert_eq!(read.globals.as_deref(), Some(&globals[..]));
            let (header, first) = read_globals(&archive[..], &ring, |_| Ok(())).unwrap();
            assert_eq!(first.as_deref(), Some(&globals[..]));
            assert_eq!(header.globals.map(|g| g.bytes), Some(globals.len() as u64));
        }
    }
    // An archive without one reads as before, with no section.
    let archive = pack(&data(100), Some(&key), Compression::Zstd);
    assert_eq!(archive[8], format::VERSION);
    let (_, none) = read_globals(&archive[..], &ring, |_| Ok(())).unwrap();
    assert!(none.is_none());
}

#[test]
fn the_version_byte_and_the_globals_member_must_agree() {
    let archive = pack_with_globals(&data(10), b"{}", None);
    // Version 1 with a globals member, version 2 without one: both refused.
    let mut v1 = archive.clone();
    v1[8] = format::VERSION;
    assert!(matches!(
        unpack(&v1, &KeyRing::default()),
        Err(ArchiveError::BadHeader(_))
    ));
    let plain = pack(&data(10), None, Compression::Zstd);
    let mut v2 = plain.clone();
    v2[8] = format::VERSION_GLOBALS;
    assert!(matches!(
        unpack(&v2, &KeyRing::default()),
        Err(ArchiveError::BadHeader(_))
    ));
    let mut v3 = plain;
    v3[8] = 3;
    assert!(matches!(
        unpack(&v3, &KeyRing::default()),
        Err(ArchiveError::UnsupportedVersion(3))
    ));
}

#[test]
fn globals_are_never_printed() {
    let secret = GlobalsBytes(zeroize::Zeroizing::new(b"SCRAM-SHA-256$secret".to_vec()));
    assert!(!format!("{secret:?}").contains("SCRAM"));
}
