//! `dbkeeper retention plan DB`: what each retention rule would delete now.

use chrono::Utc;

use super::report::print_table;
use super::Exit;
use crate::config::{Config, RetentionMode};
use crate::jobs::{Jobs, Kind, Select};

pub async fn plan(config: &Config, database: &str) -> anyhow::Result<Exit> {
    let kind = Kind::Retention;
    // Only looks: a missing `mode=rwc` file is not created, nor a key.
    let jobs = Jobs::inspect(config, Select::Kind { database, kind })?;
    let rules: Vec<_> = jobs.retention_rules(database).collect();
    if rules.is_empty() {
        anyhow::bail!(
            "database \"{database}\" has no [[database.retention]] in {}",
            config.path.display()
        );
    }
    let now = Utc::now();
    let mut rows = Vec::new();
    let mut failed = false;
    let mut unreadable = false;
    for (job, r) in rules {
        let preview = match r.preview(job.db()?).await {
            Ok(p) => p,
            Err(e) => {
                failed = true;
                rows.push(vec![
                    job.id.clone(),
                    r.cfg.table.clone(),
                    "-".into(),
                    "-".into(),
                    format!("ERROR: {e}"),
                    "-".into(),
                    "-".into(),
                ]);
                continue;
            }
        };
        let age = preview
            .oldest
            .map_or_else(|| "-".to_owned(), |t| format_age((now - t).num_seconds()));
        let going = match r.cfg.mode {
            RetentionMode::Delete => format!("{} rows", preview.expired_rows),
            _ if preview.partitions.is_empty() => "no partitions".to_owned(),
            _ => format!("partitions {}", preview.partitions.join(", ")),
        };
        if preview.unreadable_rows > 0 {
            unreadable = true;
        }
        rows.push(vec![
            job.id.clone(),
            r.cfg.table.clone(),
            preview.reading.clone(),
            preview.cutoff.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
            going,
            preview.unreadable_rows.to_string(),
            age,
        ]);
    }
    print_table(
        &[
            "JOB",
            "TABLE",
            "READS TIME AS",
            "CUTOFF (UTC)",
            "WOULD DELETE",
            "UNREADABLE (KEPT)",
            "OLDEST ROW AGE",
        ],
        &rows,
    );
    if unreadable {
        eprintln!(
            "note: rows with an UNREADABLE time are never deleted; fix their values, or set epoch-unit / column-timezone if the rule reads them wrongly"
        );
    }
    Ok(if failed { Exit::Failed } else { Exit::Success })
}

/// `412d 5h`, `5h 12m`, `3m`.
fn format_age(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m}m"),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}
