//! `dbkeeper check`: is the configuration good, and is every database reachable?
//!
//! It only looks: SQLite files are opened read-only, no key is generated, no
//! missing database file or directory is created.

use chrono::{DateTime, Utc};

use super::Exit;
use crate::config::Config;
use crate::jobs::{Job, Jobs, Select};

pub async fn check(config: &Config) -> anyhow::Result<Exit> {
    let jobs = Jobs::inspect(config, Select::All)?;
    println!(
        "configuration {} is valid (databases: {}, jobs: {})",
        config.path.display(),
        jobs.databases().len(),
        jobs.len()
    );
    for file in &config.drop_ins {
        println!("drop-in {}", file.display());
    }
    for db in &config.databases {
        let key = db.backup.as_ref().and_then(|b| b.key_to_generate());
        if let Some(path) = key {
            println!(
                "database {}: key file {} does not exist yet; the daemon generates it at start (generate-key-if-missing)",
                db.name,
                path.display()
            );
        }
    }
    let mut all_up = true;
    let mut misnamed = false;
    for db in jobs.databases() {
        let source = config
            .databases
            .iter()
            .find(|c| c.name == db.name())
            .map(|c| c.source.display().to_string())
            .unwrap_or_default();
        let what = format!(
            "database {} ({}, {}, from {source})",
            db.name(),
            db.backend().as_str(),
            db.url()
        );
        match db.ping().await {
            Ok(()) => {
                match db.not_created_yet() {
                    Some(file) => println!(
                        "{what}: {} does not exist yet; the first job creates it (mode=rwc); checked as an empty database",
                        file.display()
                    ),
                    None => println!("{what}: reachable"),
                }
                // Tables, columns and views named in the config must exist in the catalog.
                for job in jobs.of_database(db.name()) {
                    match job.check().await {
                        Ok(notes) => {
                            for note in notes {
                                println!("job {}: {note}", job.id);
                            }
                        }
                        Err(e) => {
                            misnamed = true;
                            println!("job {}: CONFIG ERROR: {e}", job.id);
                            super::print_error(&format!(
                                "{}: job {}: {e}",
                                config.path.display(),
                                job.id
                            ));
                        }
                    }
                }
            }
            Err(e) => {
                all_up = false;
                println!("{what}: UNREACHABLE: {e}");
            }
        }
        db.close().await;
    }
    // A files set's backup has no database to ping: its directory must be there.
    for job in jobs.iter().filter(|j| j.database.is_none()) {
        match job.check().await {
            Ok(notes) => {
                for note in notes {
                    println!("job {}: {note}", job.id);
                }
            }
            Err(e) => {
                all_up = false;
                println!("job {}: UNREADABLE: {e}", job.id);
            }
        }
    }
    if let Some(cluster) = config.daemon.cluster_name() {
        match crate::cluster::read_view(&config.daemon).await {
            Ok(view) => println!(
                "coordination database (cluster {cluster}): reachable, {} replica(s) alive",
                view.members.len()
            ),
            Err(e) => {
                all_up = false;
                println!("coordination database (cluster {cluster}): UNREACHABLE: {e}");
            }
        }
    }
    let now = Utc::now();
    for job in jobs.iter() {
        println!("{}", describe(job, now));
    }
    Ok(if misnamed {
        Exit::Usage
    } else if all_up {
        Exit::Success
    } else {
        Exit::Failed
    })
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
