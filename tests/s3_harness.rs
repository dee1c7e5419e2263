//! Tests of the S3 test harness itself (tests/common/s3.rs): moto starts, objects go in
//! and come out, a planted multipart leftover is listed, and stop/restart/pause do
//! what the object-storage tests will rely on. With `DBKEEPER_TEST_S3_BUCKET` set they
//! run against that bucket instead (see tests/common/s3.rs); the stop/restart/pause
//! tests are then skipped.

mod common;

use common::s3::{S3Server, REAL_ROOT};
use std::time::{Duration, Instant};

#[test]
fn put_get_keys_delete() {
    let s3 = S3Server::start();
    let env = s3.env();
    if s3.is_local() {
        assert!(s3.bucket.starts_with("dbk-"), "{}", s3.bucket);
        assert_eq!(s3.root(), "");
        assert_eq!(s3.url("a/b"), format!("s3://{}/a/b", s3.bucket));
        assert!(env.contains(&("AWS_ENDPOINT_URL".to_owned(), s3.endpoint())));
        assert!(env.contains(&("AWS_ALLOW_HTTP".to_owned(), "true".to_owned())));
    } else {
        assert!(
            s3.root().starts_with(REAL_ROOT) && s3.root().ends_with('/'),
            "{}",
            s3.root()
        );
        assert_eq!(
            s3.url("a/b"),
            format!("s3://{}/{}a/b", s3.bucket, s3.root())
        );
        let id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
        assert!(env.contains(&("AWS_ACCESS_KEY_ID".to_owned(), id)));
    }
    assert_eq!(s3.keys(""), Vec::<String>::new());

    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    s3.put("db/one.dbk", &binary);
    s3.put("db/two.dbk", b"");
    s3.put("other/x", b"x");
    assert_eq!(s3.get("db/one.dbk"), binary);
    assert_eq!(s3.get("db/two.dbk"), b"");
    assert_eq!(s3.keys("db/"), ["db/one.dbk", "db/two.dbk"]);
    assert_eq!(s3.keys(""), ["db/one.dbk", "db/two.dbk", "other/x"]);

    s3.delete("db/one.dbk");
    assert_eq!(s3.keys("db/"), ["db/two.dbk"]);
}

#[test]
fn two_servers_have_their_own_buckets() {
    let a = S3Server::start();
    let b = S3Server::start();
    if a.is_local() {
        assert_ne!(a.port, b.port);
        assert_ne!(a.bucket, b.bucket);
    } else {
        assert_eq!(a.bucket, b.bucket);
        assert_ne!(a.root(), b.root());
    }
    a.put("k", b"a");
    a.create_multipart("m");
    assert_eq!(b.keys(""), Vec::<String>::new());
    assert!(b.multipart_uploads().is_empty());
}

#[test]
fn clean_removes_objects_and_unfinished_uploads() {
    let s3 = S3Server::start();
    for i in 0..3 {
        s3.put(&format!("db/app/{i}.dbk"), b"x");
    }
    s3.create_multipart("db/app/half.dbk");
    s3.clean();
    assert!(s3.keys("").is_empty(), "{:?}", s3.keys(""));
    assert!(s3.multipart_uploads().is_empty());
}

#[test]
fn a_real_bucket_root_is_emptied_on_drop() {
    let s3 = S3Server::start();
    if s3.is_local() {
        println!("skipped: only for a real bucket (DBKEEPER_TEST_S3_BUCKET)");
        return;
    }
    s3.put("db/app/x.dbk", b"x");
    s3.create_multipart("db/app/half.dbk");
    let root = s3.root().to_owned();
    assert_eq!(s3.bucket_keys(&root), [format!("{root}db/app/x.dbk")]);
    drop(s3);
    let other = S3Server::start();
    assert!(other.bucket_keys(&root).is_empty());
    assert!(other.bucket_uploads(&root).is_empty());
}

#[test]
fn stop_and_restart_come_back_empty_on_the_same_port() {
    let mut s3 = S3Server::start();
    if !s3.is_local() {
        println!("skipped: needs the local moto server");
        return;
    }
    let (port, bucket) = (s3.port, s3.bucket.clone());
    s3.put("before", b"1");
    s3.create_multipart("leftover");

    s3.stop();
    assert!(s3.pid().is_none());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a stopped server refuses connections"
    );

    s3.restart();
    assert_eq!((s3.port, s3.bucket.as_str()), (port, bucket.as_str()));
    assert!(
        s3.keys("").is_empty(),
        "moto keeps nothing across a restart"
    );
    assert!(s3.multipart_uploads().is_empty());
    s3.put("after", b"2");
    assert_eq!(s3.get("after"), b"2");

    // Restarting a running server works too.
    s3.restart();
    assert!(s3.keys("").is_empty());
}

#[test]
fn paused_server_hangs_until_resumed() {
    let s3 = S3Server::start();
    if !s3.is_local() {
        println!("skipped: needs the local moto server");
        return;
    }
    s3.put("k", b"v");
    s3.pause();
    let port = s3.port;
    let started = Instant::now();
    let probe = std::thread::spawn(move || common::http_get(port, "/"));
    std::thread::sleep(Duration::from_millis(700));
    assert!(!probe.is_finished(), "a paused server must not answer");
    s3.resume();
    assert!(
        probe.join().expect("probe").is_some(),
        "the request sent while paused is answered after resume"
    );
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(s3.get("k"), b"v");
}
