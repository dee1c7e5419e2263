//! Round trips and every kind of damage: flipped bytes, truncation, appended garbage,
//! wrong key.

use std::sync::atomic::AtomicBool;

use super::*;
use std::io::{BufReader, Read, Write};

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
        sealed: None,
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
        msg.contains(&format!("made for key {}", a.id()))
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
    // Version 3 bytes are read as an envelope, which this is not.
    let mut v3 = plain.clone();
    v3[8] = 3;
    assert!(matches!(
        unpack(&v3, &KeyRing::default()),
        Err(ArchiveError::BadHeader(_))
    ));
    let mut v4 = plain;
    v4[8] = 4;
    assert!(matches!(
        unpack(&v4, &KeyRing::default()),
        Err(ArchiveError::UnsupportedVersion(4))
    ));
}

#[test]
fn globals_are_never_printed() {
    let secret = GlobalsBytes(zeroize::Zeroizing::new(b"SCRAM-SHA-256$secret".to_vec()));
    assert!(!format!("{secret:?}").contains("SCRAM"));
}

// Version 3: recipients, envelopes, rewrap.

fn pack_v3(plain: &[u8], key: Option<&Key>, recipients: &[Recipient]) -> Vec<u8> {
    pack_v3_with(header(Compression::Zstd), plain, key, recipients)
}

fn pack_v3_with(h: Header, plain: &[u8], key: Option<&Key>, recipients: &[Recipient]) -> Vec<u8> {
    let mut w = ArchiveWriter::with_recipients(Vec::new(), h, key, recipients).unwrap();
    let dk = w.data_key().unwrap();
    let mut enc = compress::Encoder::new(Compression::Zstd, 3, 1, w).unwrap();
    enc.write_all(plain).unwrap();
    w = enc.finish().unwrap();
    let out = w.finish().unwrap();
    // The writer can read back what it wrote with the data key alone.
    let reader = ArchiveReader::open_with_data_key(&out[..], &dk).unwrap();
    let mut back = Vec::new();
    compress::decoder(Compression::Zstd, BufReader::new(reader))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, plain);
    out
}

fn ring_of(keys: &[&Key], ids: &[&Identity]) -> KeyRing {
    KeyRing::with_identities(
        keys.iter().map(|&k| k.clone()).collect(),
        ids.iter().map(|&i| i.clone()).collect(),
    )
}

/// Where a v3 archive's segments start.
fn v3_segments_start(archive: &[u8]) -> usize {
    13 + u32::from_be_bytes(archive[9..13].try_into().unwrap()) as usize + envelope::MAC_LEN
}

#[test]
fn version_3_round_trip_with_recipients_only_and_with_a_key_too() {
    let r1 = Identity::generate();
    let r2 = Identity::generate();
    let key = Key::random().unwrap();
    let plain = data(3 * SEG as usize + 5);
    let only = pack_v3(&plain, None, &[r1.recipient(), r2.recipient()]);
    assert_eq!(only[8], envelope::VERSION_ENVELOPE);
    for id in [&r1, &r2] {
        assert_eq!(unpack(&only, &ring_of(&[], &[id])).unwrap(), plain);
    }
    let (listed, _) = format::read_header(&mut &only[..]).unwrap();
    assert!(listed.is_encrypted());
    assert_eq!(listed.database, "app");
    let made_for = listed.made_for();
    assert_eq!(made_for.len(), 2);
    let id = listed.encryption.as_ref().unwrap().key_id.clone();
    assert!(id.starts_with('r') && id.len() == 16, "{id}");

    let both = pack_v3(&plain, Some(&key), &[r1.recipient()]);
    assert_eq!(unpack(&both, &ring_of(&[&key], &[])).unwrap(), plain);
    assert_eq!(unpack(&both, &ring_of(&[], &[&r1])).unwrap(), plain);
    let (_, h, _) = read_archive(
        &both[..],
        &ring_of(&[&key], &[]),
        Vec::new(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(h.encryption.as_ref().unwrap().key_id, key.id());
    assert_eq!(
        h.made_for(),
        vec![
            format!("key {}", key.id()),
            format!("recipient {}", r1.recipient())
        ]
    );
    assert_eq!(h.format_version(), 3);
    assert!(!both.windows(4).any(|w| w == &plain[..4]) || plain.len() < 4);
}

#[test]
fn without_recipients_the_writer_still_writes_version_1() {
    let key = Key::random().unwrap();
    let mut a = Vec::new();
    ArchiveWriter::with_recipients(&mut a, header(Compression::None), Some(&key), &[])
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(a[8], format::VERSION);
}

#[test]
fn a_wrong_identity_names_what_the_archive_was_made_for_and_what_was_given() {
    let r = Identity::generate();
    let other = Identity::generate();
    let key = Key::random().unwrap();
    let wrong = Key::random().unwrap();
    let archive = pack_v3(&data(100), Some(&key), &[r.recipient()]);
    let err = unpack(&archive, &ring_of(&[&wrong], &[&other])).unwrap_err();
    assert!(matches!(err, ArchiveError::WrongKey { .. }), "{err}");
    assert!(err.is_verification());
    let msg = err.to_string();
    for want in [
        format!("made for key {}, recipient {}", key.id(), r.recipient()),
        format!(
            "you have key {}, identity for {}",
            wrong.id(),
            other.recipient()
        ),
    ] {
        assert!(msg.contains(&want), "{msg} lacks {want}");
    }
}

#[test]
fn every_flipped_byte_of_a_version_3_prefix_is_rejected() {
    let r = Identity::generate();
    let key = Key::random().unwrap();
    let mut small = header(Compression::Zstd);
    small.database = "d".into();
    let archive = pack_v3_with(small, &data(2000), Some(&key), &[r.recipient()]);
    let end = v3_segments_start(&archive);
    for ring in [ring_of(&[&key], &[]), ring_of(&[], &[&r])] {
        for pos in 0..end {
            let mut bad = archive.clone();
            bad[pos] ^= 0x20;
            match unpack(&bad, &ring) {
                Err(e) => assert!(e.is_verification(), "byte {pos}: {e}"),
                Ok(_) => panic!("flipped byte {pos} of {end} accepted"),
            }
        }
    }
}

#[test]
fn a_cut_version_3_archive_is_detected() {
    let r = Identity::generate();
    let ring = ring_of(&[], &[&r]);
    let archive = pack_v3(&data(40_000), None, &[r.recipient()]);
    let start = v3_segments_start(&archive);
    for cut in [
        5,
        12,
        13,
        start - 40,
        start - 1,
        start,
        start + 10,
        archive.len() - 1,
    ] {
        let err = unpack(&archive[..cut], &ring).expect_err(&format!("cut at {cut}"));
        assert!(err.is_verification(), "cut at {cut}: {err}");
    }
}

/// Applies a [`Rewrapped`] to a whole archive in memory.
fn apply(archive: &[u8], re: &Rewrapped) -> Vec<u8> {
    let mut out = re.prefix.clone();
    out.extend_from_slice(&archive[re.segments_offset as usize..]);
    out
}

#[test]
fn rewrap_moves_version_1_and_2_archives_to_recipients_keeping_the_segments() {
    let a = Key::random().unwrap();
    let r = Identity::generate();
    let plain = data(5 * SEG as usize);
    for v in [1u8, 2] {
        let archive = if v == 1 {
            pack(&plain, Some(&a), Compression::Gzip)
        } else {
            pack_with_globals(&plain, br#"{"roles":[]}"#, Some(&a))
        };
        assert_eq!(archive[8], v);
        let re = rewrap(
            &mut &archive[..],
            &ring_of(&[&a], &[]),
            None,
            &[r.recipient()],
        )
        .unwrap();
        let header_end = 13 + u32::from_be_bytes(archive[9..13].try_into().unwrap()) as u64;
        assert_eq!(re.segments_offset, header_end);
        let moved = apply(&archive, &re);
        assert_eq!(moved[8], 3);
        assert_eq!(moved[re.prefix.len()..], archive[header_end as usize..]);
        let read = read_archive_gated(
            &moved[..],
            &ring_of(&[], &[&r]),
            Vec::new(),
            &AtomicBool::new(false),
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(read.sink, plain);
        assert_eq!(read.header.format_version(), 3);
        assert_eq!(read.header.globals.is_some(), v == 2);
        let err = unpack(&moved, &ring_of(&[&a], &[])).unwrap_err();
        assert!(matches!(err, ArchiveError::WrongKey { .. }), "{err}");
    }
}

#[test]
fn rewrap_of_version_3_to_a_key_and_its_refusals() {
    let r = Identity::generate();
    let b = Key::random().unwrap();
    let plain = data(2 * SEG as usize + 7);
    let archive = pack_v3(&plain, None, &[r.recipient()]);
    let re = rewrap(&mut &archive[..], &ring_of(&[], &[&r]), Some(&b), &[]).unwrap();
    assert_eq!(re.segments_offset as usize, v3_segments_start(&archive));
    let moved = apply(&archive, &re);
    assert_eq!(
        moved[re.prefix.len()..],
        archive[v3_segments_start(&archive)..]
    );
    assert_eq!(unpack(&moved, &ring_of(&[&b], &[])).unwrap(), plain);
    assert!(matches!(
        unpack(&moved, &ring_of(&[], &[&r])),
        Err(ArchiveError::WrongKey { .. })
    ));
    // Nothing to rewrap to; an unencrypted archive; the wrong key; a tampered envelope.
    assert!(rewrap(&mut &archive[..], &ring_of(&[], &[&r]), None, &[]).is_err());
    let plain_archive = pack(&data(10), None, Compression::None);
    assert!(rewrap(&mut &plain_archive[..], &KeyRing::default(), Some(&b), &[]).is_err());
    assert!(matches!(
        rewrap(&mut &archive[..], &ring_of(&[&b], &[]), Some(&b), &[]),
        Err(ArchiveError::WrongKey { .. })
    ));
    let mut bent = archive.clone();
    let pos = 13 + 5; // inside the envelope's "database" value
    bent[pos] ^= 0x01;
    let err = rewrap(&mut &bent[..], &ring_of(&[], &[&r]), Some(&b), &[]).unwrap_err();
    assert!(err.is_verification(), "{err}");
}

#[test]
fn write_archive_for_recipients_checks_with_the_data_key_alone() {
    let r = Identity::generate();
    let key = Key::random().unwrap();
    let plain = data(4 * SEG as usize + 1);
    for k in [None, Some(&key)] {
        let settings = Settings {
            header: header(Compression::Zstd),
            key: k,
            compression: Compression::Zstd,
            level: 3,
            threads: 2,
            check_with: Some(KeyRing::default()),
            globals: None,
        };
        let (out, stats) = write_archive_for(
            &plain[..],
            Vec::new(),
            settings,
            &[r.recipient()],
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(matches!(stats.checked, Some(Ok(()))), "{:?}", stats.checked);
        assert_eq!(out[8], envelope::VERSION_ENVELOPE);
        assert_eq!(stats.sha256, sha256_of(&out[..]).unwrap().0);
        assert_eq!(unpack(&out, &ring_of(&[], &[&r])).unwrap(), plain);
        assert_eq!(unpack(&out, &ring_of(&[&key], &[])).is_ok(), k.is_some());
    }
}
