//! `dbkeeper check`: is the configuration good, and is every database reachable?

use chrono::{DateTime, Utc};

use super::Exit;
use crate::config::Config;
use crate::jobs::{self, Job};

pub async fn check(config: &Config) -> anyhow::Result<Exit> {
    let databases = jobs::open_databases(config)?;
    let jobs = jobs::build(config, &databases)?;
    println!(
        "configuration {} is valid (databases: {}, jobs: {})",
        config.path.display(),
        databases.len(),
        jobs.len()
    );
    let mut all_up = true;
    for cfg in &config.databases {
        let db = &databases[&cfg.name];
        match db.ping().await {
            Ok(()) => println!(
                "database {} ({}, {}): reachable",
                cfg.name,
                db.backend().as_str(),
                db.url()
            ),
            Err(e) => {
                all_up = false;
                println!(
                    "database {} ({}, {}): UNREACHABLE: {e}",
                    cfg.name,
                    db.backend().as_str(),
                    db.url()
                );
            }
        }
        db.close().await;
    }
    let now = Utc::now();
    for job in &jobs {
        println!("{}", describe(job, now));
    }
    Ok(if all_up { Exit::Success } else { Exit::Failed })
}

/// One job and its next three run times, e.g.
/// `job app.sql.vacuum (sql): "0 0 3 * * *" in UTC; next 2026-11-22 03:00:00 UTC, …`.
fn describe(job: &Job, now: DateTime<Utc>) -> String {
    let opts = &job.options;
    let head = format!("job {} ({}): \"{}\"", job.id, job.kind(), opts.schedule);
    if opts.schedule.is_startup() {
        return format!("{head}: runs at every daemon start");
    }
    let next = opts.schedule.upcoming(now, &opts.timezone, 3);
    if next.is_empty() {
        return format!(
            "{head}: runs only when started by hand (dbkeeper run-job {})",
            job.id
        );
    }
    let times: Vec<String> = next
        .iter()
        .map(|t| super::report::format_time_in(*t, &opts.timezone))
        .collect();
    format!("{head} in {}; next {}", opts.timezone, times.join(", "))
}
