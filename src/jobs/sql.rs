//! `sql` jobs: run a configured statement, e.g. `VACUUM` or `SELECT refresh_totals()`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{JobError, Outcome};
use crate::db::Database;

#[derive(Debug)]
pub struct SqlJob {
    pub statement: String,
}

impl SqlJob {
    pub async fn run(
        &self,
        db: &Database,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Outcome, JobError> {
        let rows = db.execute_script(&self.statement, timeout, cancel).await?;
        Ok(Outcome {
            summary: format!("{rows} rows affected"),
            details: serde_json::json!({ "rows_affected": rows }),
        })
    }
}
