//! `dbkeeper migrate status|plan|apply DB`.

use super::report::print_table;
use super::Exit;
use crate::config::Config;
use crate::jobs::migrate::file_name;
use crate::jobs::{self, Jobs, Kind, Select};

/// The database's migrate job alone (with its pre-migration backup): no other
/// database is opened and no other key loaded.
fn migrate_jobs(config: &Config, database: &str) -> anyhow::Result<Jobs> {
    let kind = Kind::Migrate;
    Ok(Jobs::select(config, Select::Kind { database, kind })?)
}

fn no_migrate(config: &Config, database: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "database \"{database}\" has no [database.migrate] in {}",
        config.path.display()
    )
}

/// Applied, pending and drifted migrations; exit 1 if something blocks `apply`.
/// Command migrations: the pending-command's output and verdict.
pub async fn status(config: &Config, database: &str) -> anyhow::Result<Exit> {
    let jobs = migrate_jobs(config, database)?;
    let (job, m) = jobs
        .migrate_for(database)
        .ok_or_else(|| no_migrate(config, database))?;
    if m.is_command() {
        let p = m.command_status(job.db()?).await?;
        if !p.output.is_empty() {
            println!("{}", p.output);
        }
        println!(
            "{database}: {}",
            match p.pending {
                Some(true) => "pending (the pending-command exited 1)",
                Some(false) => "up to date (the pending-command exited 0)",
                None =>
                    "unknown: no pending-command is configured, so every apply runs the command",
            }
        );
        return Ok(Exit::Success);
    }
    let a = m.status(job.db()?).await?;
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

/// The exact SQL `apply` would run, in order; applies nothing. Command migrations:
/// the plan-command's stdout.
pub async fn plan(config: &Config, database: &str) -> anyhow::Result<Exit> {
    let jobs = migrate_jobs(config, database)?;
    let (job, m) = jobs
        .migrate_for(database)
        .ok_or_else(|| no_migrate(config, database))?;
    if m.is_command() {
        return match m.command_plan(job.db()?).await? {
            Some(ran) => {
                if !ran.stdout.is_empty() {
                    println!("{}", ran.stdout);
                }
                Ok(Exit::Success)
            }
            None => {
                super::print_error(&format!(
                    "database \"{database}\" has no plan-command in [database.migrate] of {}; add one (e.g. plan-command = [\"alembic\", \"upgrade\", \"head\", \"--sql\"]) to preview what apply runs",
                    config.path.display()
                ));
                Ok(Exit::Usage)
            }
        };
    }
    let a = m.status(job.db()?).await?;
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
            file_name(m.dir(), mig.version),
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

/// Runs the migrate job now, exactly as the daemon would (and as `run-job` does);
/// `dry_run_on_copy` turns on `dry-run-on-copy` for this run.
pub async fn apply(config: &Config, database: &str, dry_run_on_copy: bool) -> anyhow::Result<Exit> {
    let id = format!("{database}.migrate");
    if !jobs::entries(config).iter().any(|e| e.id == id) {
        return Err(no_migrate(config, database));
    }
    let mut config = config.clone();
    if let Some(m) = config
        .databases
        .iter_mut()
        .find(|d| d.name == database)
        .and_then(|d| d.migrate.as_mut())
    {
        if dry_run_on_copy && !m.backup_first {
            super::print_error(&format!(
                "--dry-run-on-copy copies the pre-migration backup, but database \"{database}\" has backup-first = false in {}; set backup-first = true",
                config.path.display()
            ));
            return Ok(Exit::Usage);
        }
        m.dry_run_on_copy |= dry_run_on_copy;
    }
    super::report::run_job(&config, &id).await
}
