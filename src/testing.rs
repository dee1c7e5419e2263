//! Helpers for the crate's own unit tests that need the test PostgreSQL server.

use std::process::Command;

/// The test server (trust authentication), without a database.
pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// Runs `sql` with psql in database `db` on [`SERVER`], stopping at the first error;
/// returns its unaligned output, trimmed.
pub fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(format!("{SERVER}/{db}"))
        .args(["-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
