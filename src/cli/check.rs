//! `dbkeeper check`: is the configuration good, and is every database reachable?

use chrono::{DateTime, Utc};

use super::Exit;
use crate::config::Config;
use crate::jobs::{self, Job, Work};

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
    let mut misnamed = false;
    for cfg in &config.databases {
        let db = &databases[&cfg.name];
        let what = format!(
            "database {} ({}, {})",
            cfg.name,
            db.backend().as_str(),
            db.url()
        );
        match db.ping().await {
            Ok(()) => {
                println!("{what}: reachable");
                for job in jobs.iter().filter(|j| j.database_name() == cfg.name) {
                    if let Err(e) = check_names(job).await {
                        misnamed = true;
                        println!("job {}: CONFIG ERROR: {e}", job.id);
                        eprintln!("error: {}: job {}: {e}", config.path.display(), job.id);
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
    let now = Utc::now();
    for job in &jobs {
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

/// Tables, columns and views named in the config must exist in the catalog.
async fn check_names(job: &Job) -> anyhow::Result<()> {
    match &job.work {
        Work::Retention(r) => {
            let target = r.check(&job.database).await?;
            println!(
                "job {}: reads {}.{} as {}",
                job.id, r.cfg.table, r.cfg.column, target.reading
            );
        }
        Work::Refresh(r) => r.check(&job.database).await?,
        Work::Migrate(m) => {
            let status = m.status(&job.database).await?;
            for problem in &status.problems {
                println!("job {}: WARNING: {problem}", job.id);
            }
            if !status.pending.is_empty() {
                println!(
                    "job {}: {} migrations pending",
                    job.id,
                    status.pending.len()
                );
            }
        }
        Work::Backup(_) | Work::Sql(_) => {}
    }
    Ok(())
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
