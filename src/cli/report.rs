//! `dbkeeper jobs`, `dbkeeper history` and `dbkeeper run-job`: the run history as
//! tables, and running one job by hand.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::Exit;
use crate::config::Config;
use crate::jobs::{self, Job, Jobs, Select, Trigger};
use crate::notify::{ping, Pinger};
use crate::reporter::Reporter;
use crate::runner::{RunOutcome, Runner};
use crate::schedule::TimeZone;
use crate::state::{JobLast, RunRecord, RunResult, StateDb};

/// `2026-11-22 03:00:00 UTC`, or with the job's zone: `2026-11-22 03:00:00 CET (02:00:00Z)`.
pub fn format_time_in(t: DateTime<Utc>, tz: &TimeZone) -> String {
    if tz.0 == chrono_tz::UTC {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    } else {
        format!(
            "{} ({}Z)",
            t.with_timezone(&tz.0).format("%Y-%m-%d %H:%M:%S %Z"),
            t.format("%H:%M:%S")
        )
    }
}

fn format_opt(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// Prints rows as left-aligned columns under a header.
pub(super) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// The run history if the state database exists; a read-only command does not
/// create one.
async fn open_history(config: &Config) -> anyhow::Result<Option<StateDb>> {
    Ok(StateDb::open_read_only(&config.daemon.state_dir).await?)
}

/// The table of jobs: read from the configuration and the run history; opens no
/// database and loads no key. A replica also reads the coordination database: each
/// job's newest run across the cluster, the replica that ran it, and the alive members.
pub async fn jobs(config: &Config) -> anyhow::Result<Exit> {
    let jobs = jobs::entries(config);
    let mut last: HashMap<String, JobLast> = match open_history(config).await? {
        Some(state) => state.last_runs().await?,
        None => HashMap::new(),
    };
    let view = match config.daemon.coordination {
        Some(_) => match crate::cluster::read_view(&config.daemon).await {
            Ok(view) => Some(view),
            Err(e) => {
                eprintln!("warning: {e}; showing this host's run history only");
                None
            }
        },
        None => None,
    };
    if let Some(view) = &view {
        for (job, c) in &view.jobs {
            let l = last.entry(job.clone()).or_default();
            if c.last_run > l.last_run {
                l.last_run = c.last_run;
                l.last_result = c.last_result.as_deref().map(RunResult::parse);
            }
            l.last_success = l.last_success.max(c.last_success);
            l.last_failure = l.last_failure.max(c.last_failure);
        }
    }
    let now = Utc::now();
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            let l = last.get(&job.id).cloned().unwrap_or_default();
            let opts = &job.options;
            let mut row = vec![
                job.id.clone(),
                job.kind().as_str().to_owned(),
                opts.schedule.to_string(),
                l.last_result.map_or("-", |r| r.as_str()).to_owned(),
                format_opt(l.last_success),
                opts.schedule
                    .next_after(now, &opts.timezone)
                    .map_or_else(|| "-".to_owned(), |t| format_time_in(t, &opts.timezone)),
            ];
            if let Some(view) = &view {
                let by = view.jobs.get(&job.id).and_then(|c| c.last_replica.clone());
                row.push(by.unwrap_or_else(|| "-".to_owned()));
            }
            row
        })
        .collect();
    let mut header = vec![
        "JOB",
        "KIND",
        "SCHEDULE",
        "LAST RESULT",
        "LAST SUCCESS (UTC)",
        "NEXT RUN",
    ];
    if view.is_some() {
        header.push("LAST REPLICA");
    }
    print_table(&header, &rows);
    if let Some(view) = &view {
        println!(
            "\ncluster {}: {} replica(s) alive",
            view.name,
            view.members.len()
        );
        let members: Vec<Vec<String>> = view
            .members
            .iter()
            .map(|m| {
                vec![
                    m.replica.clone(),
                    m.host.clone(),
                    m.pid.to_string(),
                    format_opt(Some(m.started_at)),
                    format_opt(Some(m.seen_at)),
                ]
            })
            .collect();
        print_table(
            &["REPLICA", "HOST", "PID", "STARTED (UTC)", "SEEN (UTC)"],
            &members,
        );
    }
    Ok(Exit::Success)
}

pub async fn history(config: &Config, job: Option<&str>, limit: u32) -> anyhow::Result<Exit> {
    let runs: Vec<RunRecord> = match open_history(config).await? {
        Some(state) => state.history(job, limit).await?,
        None => Vec::new(),
    };
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let took = r
                .finished_at
                .and_then(|f| (f - r.started_at).to_std().ok())
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
            vec![
                format_opt(Some(r.started_at)),
                r.job.clone(),
                r.trigger.clone(),
                r.result.as_str().to_owned(),
                took,
                r.attempts.to_string(),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "STARTED (UTC)",
            "JOB",
            "TRIGGER",
            "RESULT",
            "TOOK",
            "ATTEMPTS",
            "ERROR",
        ],
        &rows,
    );
    Ok(Exit::Success)
}

pub async fn run_job(config: &Config, id: &str) -> anyhow::Result<Exit> {
    let chosen = Jobs::select(config, Select::Id(id))?;
    let Some(job) = chosen.get(id).cloned() else {
        let all = jobs::entries(config);
        let known: Vec<&str> = all.iter().map(|j| j.id.as_str()).collect();
        super::print_error(&format!(
            "no job \"{id}\" in {}; configured jobs: {}",
            config.path.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ));
        return Ok(Exit::Usage);
    };
    let state = StateDb::open(&config.daemon.state_dir).await?;
    // Pinged like a scheduled run: a run by hand (or from a cron job) is a run
    // the monitor should know of.
    let pinger = Pinger::new()?;
    let report = Reporter::default().with_pinger(pinger.clone());
    let runner = Runner::new(state.clone(), report, 1);
    let outcome = run_interruptible(&runner, job).await;
    pinger.shutdown(ping::GRACE).await;
    state.close().await;
    Ok(match outcome {
        RunOutcome::Success(o) => {
            println!("{id}: success: {}", o.summary);
            Exit::Success
        }
        RunOutcome::Failure { message, config } => {
            super::print_failure(&format!("{id}: failed: {message}"));
            if config {
                Exit::Usage
            } else {
                Exit::Failed
            }
        }
        RunOutcome::Skipped(reason) => {
            super::print_failure(&format!("{id}: not run ({})", reason.as_str()));
            Exit::Failed
        }
    })
}

/// Runs the job; Ctrl-C or SIGTERM cancels it cleanly.
async fn run_interruptible(runner: &Runner, job: Arc<Job>) -> RunOutcome {
    let run = runner.run(job, Trigger::Manual);
    tokio::pin!(run);
    tokio::select! {
        outcome = &mut run => outcome,
        _ = crate::shutdown_signal() => {
            eprintln!("interrupted: cancelling the job");
            runner.cancel_all();
            run.await
        }
    }
}
