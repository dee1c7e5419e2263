//! `dbkeeper migrate status|plan|apply DB`.

use std::sync::Arc;

use super::report::print_table;
use super::Exit;
use crate::config::Config;
use crate::jobs::migrate::{file_name, MigrateJob};
use crate::jobs::{self, Job, Work};

fn migrate_job(config: &Config, database: &str) -> anyhow::Result<Arc<Job>> {
    let databases = jobs::open_databases(config)?;
    jobs::build(config, &databases)?
        .into_iter()
        .find(|j| j.database_name() == database && matches!(j.work, Work::Migrate(_)))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "database \"{database}\" has no [database.migrate] in {}",
                config.path.display()
            )
        })
}

fn migrate_of(job: &Job) -> anyhow::Result<&MigrateJob> {
    match &job.work {
        Work::Migrate(m) => Ok(m),
        _ => Err(anyhow::anyhow!("{} is not a migrate job", job.id)),
    }
}

/// Applied, pending and drifted migrations; exit 1 if something blocks `apply`.
pub async fn status(config: &Config, database: &str) -> anyhow::Result<Exit> {
    let job = migrate_job(config, database)?;
    let a = migrate_of(&job)?.status(&job.database).await?;
    let rows: Vec<Vec<String>> = a
        .rows
        .iter()
        .map(|(version, description, state, installed)| {
            vec![
                version.to_string(),
                description.clone(),
                state.as_str().to_owned(),
                installed.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    print_table(&["VERSION", "DESCRIPTION", "STATE", "INSTALLED ON"], &rows);
    if let Some(pid) = a.running {
        println!("in progress: the migration lock is held by pid {pid}; a RUNNING migration is no failure, leave its row alone until it ends");
    }
    for p in &a.problems {
        eprintln!("blocked: {p}");
    }
    Ok(if a.problems.is_empty() {
        Exit::Success
    } else {
        Exit::Failed
    })
}

/// The exact SQL `apply` would run, in order; applies nothing.
pub async fn plan(config: &Config, database: &str) -> anyhow::Result<Exit> {
    let job = migrate_job(config, database)?;
    let m = migrate_of(&job)?;
    let a = m.status(&job.database).await?;
    for p in &a.problems {
        eprintln!("blocked: {p}");
    }
    if a.pending.is_empty() {
        println!("-- {database}: nothing to apply");
    }
    for mig in &a.pending {
        println!(
            "-- migration {} ({}){}",
            mig.version,
            file_name(&m.cfg.dir, mig.version),
            if mig.no_tx {
                ", outside a transaction"
            } else {
                ", in one transaction"
            }
        );
        println!("{}\n", mig.sql.as_str().trim_end());
    }
    Ok(if a.problems.is_empty() {
        Exit::Success
    } else {
        Exit::Failed
    })
}

/// Runs the migrate job now, exactly as the daemon would (and as `run-job` does).
pub async fn apply(config: &Config, database: &str) -> anyhow::Result<Exit> {
    migrate_job(config, database)?;
    super::report::run_job(config, &format!("{database}.migrate")).await
}
